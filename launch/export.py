"""``distillset export``: a distilled set as an ImageFolder tree, a Hugging Face dataset on disk, or timm-readable
webdataset shards. Every format is written to a temporary folder and renamed into place, so a failed export never
leaves a half-written folder under the final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distillset.core.data import encode_png, write_shard
from distillset.core.distilled import load_distilled, sample_key
from distillset.core.errors import DistillError
from distillset.core.io import inside, read_json, temp_folder, write_json, write_text

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
        soft_labels: copy the set's soft labels (labels/, as `distillset relabel` wrote them) beside the images.
        metrics: the metrics.json whose accuracies the dataset card quotes (default: DISTILLED/eval/metrics.json
            when it exists).
    """

    distilled: str = "output/recover"
    out: str = "output/export"
    format: str = "imagefolder"
    overwrite: bool = False
    maxcount: int = 1000
    soft_labels: bool = True
    metrics: str = ""

    def __post_init__(self):
        if self.format not in ("imagefolder", "hf", "wds"):
            raise DistillError(f"unknown export format '{self.format}'; use imagefolder, hf or wds.")


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` only if the block finishes (a failed export never
    leaves a half-written folder under the final name); an existing ``out`` is refused unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise DistillError(f"{out} already exists; choose another --out or pass --overwrite true.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    with staged_folder(out, cfg.overwrite) as tmp:
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
        if cfg.soft_labels:
            _copy_soft_labels(Path(cfg.distilled), tmp)
        write_json(tmp / "manifest.json", manifest)
        write_text(tmp / "README.md", dataset_card(manifest, cfg, len(images), _metrics(cfg),
                                                   (tmp / "labels").exists()))
    log.info("export: %d images as %s in %s", len(images), cfg.format, out)
    rt.wait()
    return {"images": len(images), "format": cfg.format, "out": str(out)}


def _copy_soft_labels(folder: Path, dest: Path) -> None:
    """``labels/labels.json`` and the label files it counts (names checked to stay inside the set's folder)."""
    meta_path = folder / "labels" / "labels.json"
    if not meta_path.exists():
        return
    meta = read_json(meta_path)
    (dest / "labels").mkdir()
    shutil.copy2(meta_path, dest / "labels" / "labels.json")
    for k in range(int(meta.get("files", 0))):
        src = inside(folder, f"labels/soft-{k:06d}.safetensors", "labels.json 'files'", must_exist=True)
        shutil.copy2(src, dest / "labels" / src.name)


def _metrics(cfg: ExportConfig) -> dict | None:
    path = Path(cfg.metrics) if cfg.metrics else Path(cfg.distilled) / "eval" / "metrics.json"
    if cfg.metrics and not path.exists():
        raise DistillError(f"--metrics {path} does not exist; run `distillset evaluate` first or drop --metrics.")
    return read_json(path) if path.exists() else None


def dataset_card(manifest: dict, cfg: ExportConfig, n: int, metrics: dict | None, soft: bool) -> str:
    """A Hugging Face-style dataset card (YAML front matter + what the set is, how it was made, what it scores)."""
    method, ipc = manifest.get("method", "?"), manifest.get("ipc", "?")
    teachers = ", ".join(f"{t.get('arch', '?')} (sha256 {str(t.get('sha256', ''))[:12]})"
                         for t in manifest.get("teachers") or []) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("versions") or {}).items()))
    shape = "x".join(map(str, manifest.get("image_shape", [])))
    zca = f"; ZCA whitening in `{manifest['zca']}` (apply it before training)" if manifest.get("zca") else ""
    labels = "in `labels/` (FKD-style, per epoch and crop; see labels/labels.json)" if soft else "none"
    lines = ["---", "license: other",
             "license_details: derived from the source dataset; the source's licence applies to these images",
             "task_categories:", "- image-classification", "tags:", "- dataset-distillation", f"- {method}",
             f"pretty_name: {method} distilled set (IPC {ipc})", "---", "",
             f"# {method} distilled set, {ipc} images per class", "",
             f"{n} synthetic images of {manifest.get('num_classes', '?')} classes ({shape}), distilled by distillset "
             f"(method `{method}`, parametrization `{manifest.get('parametrization', '?')}`) from "
             f"`{manifest.get('data') or 'a teacher only'}`.", "",
             "## How it was made", "",
             f"- teachers: {teachers}",
             f"- seed: {manifest.get('seeds', {}).get('base', '?')}; versions: {versions}",
             f"- input normalisation: mean {manifest.get('mean')}, std {manifest.get('std')}{zca}",
             f"- soft labels: {labels}",
             "- full configuration: `manifest.json`", "", "## Evaluation", ""]
    if metrics:
        lines += [f"Students ({metrics.get('protocol')} protocol, {metrics.get('epochs')} epochs) trained on this set "
                  "and on random real images at the same IPC, top-1 on the real test split:", "",
                  "| arch | set | labels | top-1 (%) |", "| --- | --- | --- | --- |"]
        lines += [f"| {s['arch']} | {s['set']} | {s['labels']} | {100 * s['mean']:.2f} +- {100 * s['std']:.2f} |"
                  for s in metrics.get("summary", [])]
    else:
        lines.append("Not evaluated yet: `distillset evaluate --distilled FOLDER` reports it beside random real "
                     "images.")
    return "\n".join(lines) + "\n"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DistillError("export to hf needs the 'datasets' package; pip install datasets.") from None
    return datasets


def _pil(image):
    from PIL import Image

    a = image.numpy()
    return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))


def _export_hf(images, folder: Path) -> None:
    datasets = _datasets()

    def pil(i):
        return _pil(images.images[i])

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(images.class_names))})
    ds = datasets.Dataset.from_dict({"image": [pil(i) for i in range(len(images))],
                                     "label": images.labels.tolist()}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))


def _export_hf_pairs(images, text, captions: list[str], folder: Path) -> None:
    """Image-text pairs (``distillset vl export``): columns image, text_embedding, nearest_caption."""
    datasets = _datasets()
    features = datasets.Features({"image": datasets.Image(),
                                  "text_embedding": datasets.Sequence(datasets.Value("float32")),
                                  "nearest_caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [_pil(x) for x in images], "text_embedding": text.tolist(),
                                     "nearest_caption": list(captions)}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
