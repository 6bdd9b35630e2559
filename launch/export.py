"""``distillset export``: a distilled set as an ImageFolder tree, a Hugging Face dataset on disk, or timm-readable
webdataset shards. Every format is written to a temporary folder and renamed into place, so a failed export never
leaves a half-written folder under the final name.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from distillset.core.data import encode_png, write_shard
from distillset.core.distilled import load_distilled, sample_key
from distillset.core.errors import DistillError
from distillset.core.io import inside, temp_folder, write_json

log = logging.getLogger("distillset.export")


@dataclass
class ExportConfig:
    """Export a distilled set.

    Attributes:
        distilled: the distilled-set folder.
        out: the folder to create (must not exist, unless overwrite).
        format: imagefolder, hf (Hugging Face dataset on disk) or wds (webdataset shards + timm _info.json).
        overwrite: replace an existing export folder.
        maxcount: samples per shard (wds).
    """

    distilled: str = "output/recover"
    out: str = "output/export"
    format: str = "imagefolder"
    overwrite: bool = False
    maxcount: int = 1000

    def __post_init__(self):
        if self.format not in ("imagefolder", "hf", "wds"):
            raise DistillError(f"unknown export format '{self.format}'; use imagefolder, hf or wds.")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "class"


def run(cfg: ExportConfig, rt=None) -> dict:
    from distillset.core.runtime import get_runtime

    rt = rt or get_runtime()
    out = Path(cfg.out)
    if not rt.is_main:
        rt.wait()
        return {}
    images, manifest = load_distilled(cfg.distilled)
    if out.exists() and not cfg.overwrite:
        raise DistillError(f"{out} already exists; choose another --out or pass --overwrite true.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    try:
        counts: dict[int, int] = {}
        keys = []
        for i in range(len(images)):
            c = int(images.labels[i])
            keys.append(sample_key(c, counts.get(c, 0)))
            counts[c] = counts.get(c, 0) + 1
        names = images.class_names
        if cfg.format == "imagefolder":
            dirs = [f"{c:05d}_{_safe(n)}" if len(names) > 1 else _safe(n) for c, n in enumerate(names)]
            for i, key in enumerate(keys):
                d = tmp / "train" / dirs[int(images.labels[i])]
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{key}.png").write_bytes(encode_png(images.images[i]))
        elif cfg.format == "hf":
            _export_hf(images, tmp)
        else:
            files = []
            for k, s in enumerate(range(0, len(images), cfg.maxcount)):
                name = f"train-{k:06d}.tar"
                write_shard(tmp / name, [(keys[i], images.images[i], int(images.labels[i]), None)
                                         for i in range(s, min(len(images), s + cfg.maxcount))])
                files.append(name)
            lengths = [min(cfg.maxcount, len(images) - s) for s in range(0, len(images), cfg.maxcount)]
            write_json(tmp / "_info.json", {
                "name": manifest.get("method", "distilled"), "num_classes": len(names), "class_names": names,
                "image_shape": list(images.image_shape),
                "splits": {"train": {"name": "train", "num_samples": len(images), "filenames": files,
                                     "shard_lengths": lengths}}})
        if manifest.get("zca"):  # the set lives in whitened space: whoever trains on it needs the same transform
            src = inside(cfg.distilled, manifest["zca"], "manifest.json 'zca'", must_exist=True)
            name = src.relative_to(Path(cfg.distilled).resolve())
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)
            manifest = {**manifest, "zca": name.as_posix()}  # the name inside the export folder, never a path
        write_json(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("export: %d images as %s in %s", len(images), cfg.format, out)
    rt.wait()
    return {"images": len(images), "format": cfg.format, "out": str(out)}


def _export_hf(images, folder: Path) -> None:
    try:
        import datasets
    except ImportError:
        raise DistillError("export to hf needs the 'datasets' package; pip install datasets.") from None
    from PIL import Image

    def pil(i):
        a = images.images[i].numpy()
        return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(images.class_names))})
    ds = datasets.Dataset.from_dict({"image": [pil(i) for i in range(len(images))],
                                     "label": images.labels.tolist()}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
