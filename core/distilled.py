"""The distilled-set folder: manifest.json + images/shard-*.tar (+ labels/, latents/). Reading and the grid PNG."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from distillset.core.data import ImageSet, member_key, read_tar_samples
from distillset.core.errors import DistillError
from distillset.core.io import inside, read_json

SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")
# what a reader tells the user about a damaged shard of a distilled set (a source's shards are re-made otherwise)
SHARD_ADVICE = "delete it and re-run the same `distillset recover` command to write it again"


def shard_path(out: str | Path, unit: int) -> Path:
    return Path(out) / shard_name(unit)


def shard_name(unit: int) -> str:
    """A unit's shard as named in the manifest (relative to the set's folder)."""
    return f"images/shard-{unit:06d}.tar"


def sample_key(cls: int, index: int) -> str:
    return f"c{cls:05d}_i{index:04d}"


def unit_record(index: int, c0: int, c1: int, i0: int, i1: int) -> dict:
    """One entry of the manifest's ``units`` list: the writer's layout, so readers never recompute it."""
    return {"index": index, "classes": [c0, c1], "indices": [i0, i1], "shard": shard_name(index)}


def unit_keys(unit: dict) -> list[str]:
    """The sample keys a unit's shard holds, in key order."""
    (c0, c1), (i0, i1) = unit["classes"], unit["indices"]
    return [sample_key(c, i) for c in range(c0, c1) for i in range(i0, i1)]


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise DistillError(f"{folder} is not a distilled set (no manifest.json); run `distillset recover` first.")
    manifest = read_json(folder / "manifest.json")
    if not isinstance(manifest, dict):
        raise DistillError(f"{folder}/manifest.json is not a manifest (not a JSON object); re-run recover.")
    return manifest


def manifest_units(folder: str | Path, manifest: dict) -> list[dict] | None:
    """The manifest's unit list, checked (``None`` for manifests written before it was recorded).

    Each unit's class and index ranges must lie within the set's classes and ipc, the units must cover every
    (class, index) once, and each shard name must be a file name inside the folder.
    """
    units = manifest.get("units")
    if units is None:
        return None
    folder = Path(folder)
    bad = f"{folder}/manifest.json has a damaged unit list"
    try:
        num_classes, ipc = len(manifest["class_names"]), int(manifest["ipc"])
        checked, covered = [], 0
        for u in units:
            (c0, c1), (i0, i1) = (int(x) for x in u["classes"]), (int(x) for x in u["indices"])
            if not (0 <= c0 < c1 <= num_classes and 0 <= i0 < i1 <= ipc):
                raise DistillError(f"{bad} (unit {u.get('index')} spans classes {c0}-{c1}, indices {i0}-{i1} of "
                                   f"{num_classes} classes x ipc {ipc}); re-run recover into a new folder.")
            covered += (c1 - c0) * (i1 - i0)
            checked.append({"index": int(u["index"]), "classes": [c0, c1], "indices": [i0, i1],
                            "shard": str(u["shard"])})
    except (KeyError, TypeError, ValueError):
        raise DistillError(f"{bad} (each unit needs index, classes, indices and shard); re-run recover into a new "
                           "folder.") from None
    if covered != num_classes * ipc:
        raise DistillError(f"{bad}: its units hold {covered} images but {num_classes} classes x ipc {ipc} = "
                           f"{num_classes * ipc}; re-run recover into a new folder.")
    return checked


def distilled_shards(folder: str | Path, manifest: dict) -> list[tuple[Path, dict | None]]:
    """Every shard of the set with the unit it holds, checked to exist inside the folder.

    With a unit list (every manifest written since it was recorded), a shard the manifest names but the folder
    lacks is an error; without one (older folders), the shards present are returned with ``None`` as unit, and
    the readers check the total count against ``ipc x num_classes``.
    """
    folder = Path(folder)
    units = manifest_units(folder, manifest)
    if units is None:
        shards = [inside(folder, p.relative_to(folder), "shard")
                  for p in sorted((folder / "images").glob("shard-*.tar"))]
        if not shards:
            raise DistillError(f"{folder}/images holds no shards; the run wrote no images.")
        return [(s, None) for s in shards]
    out = []
    for u in units:
        path = inside(folder, u["shard"], f"manifest.json unit {u['index']} shard")
        if not path.is_file():
            raise DistillError(f"{folder}: shard {u['shard']} of unit {u['index']} (classes {u['classes'][0]}-"
                               f"{u['classes'][1] - 1}) is missing; re-run the same `distillset recover` command "
                               "to write it again.")
        out.append((path, u))
    return out


def check_shard_keys(path: Path, unit: dict | None, keys: list[str]) -> None:
    """A shard must hold exactly its unit's samples (a shorter or foreign shard is damaged)."""
    if unit is None:
        return
    want = unit_keys(unit)
    if sorted(keys) != want:
        raise DistillError(f"shard {path} holds {len(keys)} samples but unit {unit['index']} has {len(want)} "
                           f"(classes {unit['classes'][0]}-{unit['classes'][1] - 1}, indices {unit['indices'][0]}-"
                           f"{unit['indices'][1] - 1}); {SHARD_ADVICE}.")


def check_total(folder: Path, manifest: dict, n: int) -> None:
    """Folders without a unit list: the images found must be ``ipc x num_classes``."""
    try:
        want = int(manifest["ipc"]) * len(manifest["class_names"])
    except (KeyError, TypeError, ValueError):
        return
    if n != want:
        raise DistillError(f"{folder} holds {n} images but its manifest says ipc {manifest['ipc']} x "
                           f"{len(manifest['class_names'])} classes = {want}; a shard is missing or damaged: "
                           "re-run the same `distillset recover` command to write it again.")


def shard_keys(path: Path) -> list[str]:
    """Sample keys of a shard from its member headers only (nothing is decoded; a damaged shard raises)."""
    import tarfile

    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".cls"):
                    keys.append(member_key(m.name)[0])
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DistillError(f"shard {path} is corrupt or truncated ({e}); {SHARD_ADVICE}.") from None
    return keys


def num_images(folder: str | Path, manifest: dict | None = None) -> int:
    """Number of images the set's shards hold (headers only), checked against the manifest.

    What sizes a label file is what the folder holds, never a number read from the manifest alone.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    n = 0
    for path, unit in distilled_shards(folder, manifest):
        keys = shard_keys(path)
        check_shard_keys(path, unit, keys)
        n += len(keys)
    if manifest.get("units") is None:
        check_total(folder, manifest, n)
    if "num_images" in manifest and manifest["num_images"] != n:
        raise DistillError(f"{folder}/manifest.json says {manifest['num_images']} images but its shards hold {n}; "
                           "the manifest is damaged: re-run the same `distillset recover` command.")
    return n


def load_distilled(folder: str | Path, require_complete: bool = True) -> tuple[ImageSet, dict]:
    """All images of a distilled set, sorted by (class, index), and its manifest (checked complete)."""
    from distillset.core.data import decode_sample

    folder = Path(folder)
    manifest = read_manifest(folder)
    if require_complete and manifest.get("status") != "complete":
        raise DistillError(f"{folder} is an unfinished run (status {manifest.get('status')}); re-run the same "
                           "recover command to finish it.")
    names = manifest["class_names"]
    items = []
    for s, unit in distilled_shards(folder, manifest):
        keys = []
        for sample in read_tar_samples(str(s), advice=SHARD_ADVICE):
            img, label = decode_sample(sample, len(names))
            items.append((sample["__key__"], img, label))
            keys.append(sample["__key__"])
        check_shard_keys(s, unit, keys)
    if manifest.get("units") is None and require_complete:
        check_total(folder, manifest, len(items))
    items.sort(key=lambda t: t[0])
    images = torch.stack([t[1] for t in items])
    labels = torch.tensor([t[2] for t in items])
    return ImageSet(images, labels, names), manifest


def save_grid(path: str | Path, images: ImageSet, per_class: int = 10, max_classes: int = 10, gap: int = 2) -> None:
    """A PNG grid: one row per class (first ``max_classes``) labelled with the class name, up to ``per_class``
    images each, tiles separated by ``gap`` white pixels (so 8 px digits do not merge into chains)."""
    classes = [k for k in range(min(images.num_classes, max_classes)) if bool((images.labels == k).any())]
    rows = [[images.images[i] for i in torch.nonzero(images.labels == k).flatten()[:per_class].tolist()]
            for k in classes]
    save_rows(path, rows, [images.class_names[k] for k in classes], gap=gap)


def save_rows(path: str | Path, rows: list[list[torch.Tensor]], labels: list[str] | None = None,
              header: list[str] | None = None, gap: int = 2) -> None:
    """A PNG of rows of uint8 ``(C, H, W)`` tiles (one size), each row led by its label and the columns headed by
    ``header``; small images are scaled up to about 64 px so that they can be seen."""
    from PIL import Image, ImageDraw

    from distillset.core.io import atomic_path

    first = next(t for r in rows for t in r)
    c, h, w = first.shape
    scale = max(1, 64 // w)  # make 8 px digits visible
    th, tw = h * scale, w * scale
    labels = labels or [""] * len(rows)
    label_w = 8 + 6 * max((len(s) for s in labels), default=0)
    top0 = 14 if header else 0
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_w + ncol * (tw + gap) + gap, top0 + len(rows) * (th + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header or []):
        draw.text((label_w + gap + j * (tw + gap), 2), text[: max(1, tw // 6)], fill="black")
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = top0 + gap + r * (th + gap)
        draw.text((4, top + th // 2 - 5), label, fill="black")
        for j, t in enumerate(row):
            a = t.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
            tile = Image.fromarray(a[0] if c == 1 else a.transpose(1, 2, 0)).convert("RGB")
            canvas.paste(tile, (label_w + gap + j * (tw + gap), top))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
