"""The distilled-set folder: manifest.json + images/shard-*.tar (+ labels/, latents/). Reading and the grid PNG."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from distillset.core.data import ImageSet, read_tar_samples
from distillset.core.errors import DistillError
from distillset.core.io import read_json

SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")


def shard_path(out: str | Path, unit: int) -> Path:
    return Path(out) / "images" / f"shard-{unit:06d}.tar"


def sample_key(cls: int, index: int) -> str:
    return f"c{cls:05d}_i{index:04d}"


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise DistillError(f"{folder} is not a distilled set (no manifest.json); run `distillset recover` first.")
    return read_json(folder / "manifest.json")


def load_distilled(folder: str | Path, require_complete: bool = True) -> tuple[ImageSet, dict]:
    """All images of a distilled set, sorted by (class, index), and its manifest."""
    from distillset.core.data import decode_sample

    folder = Path(folder)
    manifest = read_manifest(folder)
    if require_complete and manifest.get("status") != "complete":
        raise DistillError(f"{folder} is an unfinished run (status {manifest.get('status')}); re-run the same "
                           "recover command to finish it.")
    names = manifest["class_names"]
    shards = sorted((folder / "images").glob("shard-*.tar"))
    if not shards:
        raise DistillError(f"{folder}/images holds no shards; the run wrote no images.")
    items = []
    for s in shards:
        for sample in read_tar_samples(str(s)):
            img, label = decode_sample(sample, len(names))
            items.append((sample["__key__"], img, label))
    items.sort(key=lambda t: t[0])
    images = torch.stack([t[1] for t in items])
    labels = torch.tensor([t[2] for t in items])
    return ImageSet(images, labels, names), manifest


def save_grid(path: str | Path, images: ImageSet, per_class: int = 10, max_classes: int = 10) -> None:
    """A PNG grid: one row per class (first ``max_classes``), up to ``per_class`` images each."""
    from PIL import Image

    from distillset.core.io import atomic_path

    rows = []
    for c in range(min(images.num_classes, max_classes)):
        idx = torch.nonzero(images.labels == c).flatten()[:per_class]
        if len(idx):
            row = images.images[idx]
            pad = per_class - len(idx)
            if pad:
                row = torch.cat([row, torch.zeros(pad, *row.shape[1:], dtype=row.dtype)])
            rows.append(torch.cat(list(row), dim=2))
    grid = torch.cat(rows, dim=1)
    scale = max(1, 64 // images.images.shape[-1])  # make 8 px digits visible
    a = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
