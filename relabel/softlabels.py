"""FKD-style soft labels: for every student epoch and image, a random crop (+ flip) and the teacher's soft label.

Storage (``labels/soft-XXXXXX.safetensors``, one file per block of epochs, written atomically, resumable):
    ``values``  (E, N, k) float16: the teacher (ensemble) probabilities at ``temperature``, top-k per crop;
    ``indices`` (E, N, k) int16 (uint8 when there are <= 256 classes): their classes.
With ``topk = 0`` the full distribution is stored (values only). The crops are *not* stored: they are a pure function
of ``(crop_seed, epoch, image index)`` (:func:`epoch_crops`), recomputed identically by the student, which saves the
crop bytes FKD stores per sample. Missing probability mass (1 - sum of top-k) is spread uniformly over the other
classes when the distribution is rebuilt (:func:`dense_targets`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillset.core.config import check_number
from distillset.core.data import ImageSet
from distillset.core.errors import DistillError
from distillset.core.io import load_tensors, write_json
from distillset.core.runtime import autocast_dtype, get_runtime, progress
from distillset.squeeze.augment import affine_crop, sample_crops

log = logging.getLogger("distillset.relabel")


@dataclass
class RelabelConfig:
    """Store soft labels for a distilled set.

    Attributes:
        distilled: the distilled-set folder (labels are written to its labels/ subfolder).
        teachers: teacher specs (default: the teachers recorded in the distilled set's manifest); several = ensemble
            (probabilities averaged).
        epochs: student epochs to cover (one crop + label per image per epoch).
        topk: classes kept per crop (0 = the full distribution).
        temperature: softmax temperature of the stored probabilities (the KD temperature of the student).
        min_scale: lower bound of the RandomResizedCrop area.
        flip: random horizontal flips.
        crop_seed: seed of the crops (stored in the metadata; the student recomputes the same crops).
        epochs_per_file: epochs per safetensors file (the grain of resume).
        batch_size: teacher batch size.
        autocast: auto (bf16 where fast), bf16, fp16 or none.
        quantize: how stored probabilities are encoded: fp16, or uint8 (each crop's values scaled by their maximum,
            one fp16 scale per crop; see benchmarks/results/softlabels.md).
        prune: fraction of the (epoch, crop) soft labels kept, in (0, 1] (LPLD's random label pruning, Xiao & He,
            NeurIPS'24): ``ceil(prune x epochs)`` epochs of crops and labels are stored, and a student of ``epochs``
            epochs draws, for every image and epoch, one of its stored (crop, label) pairs at random. 1 = every
            epoch stored (FKD).
    """

    distilled: str = "output/recover"
    teachers: list[str] = field(default_factory=list)
    epochs: int = 300
    topk: int = 10
    temperature: float = 4.0
    min_scale: float = 0.08
    flip: bool = True
    crop_seed: int = 0
    epochs_per_file: int = 50
    batch_size: int = 512
    autocast: str = "auto"
    quantize: str = "fp16"
    prune: float = 1.0

    def __post_init__(self):
        if self.epochs < 1 or self.epochs_per_file < 1:
            raise DistillError("epochs and epochs_per_file must be >= 1.")
        if self.topk < 0:
            raise DistillError(f"topk must be >= 0 (0 = full distribution), got {self.topk}.")
        if not 0 < self.min_scale <= 1:
            raise DistillError(f"min_scale must be in (0, 1], got {self.min_scale}.")
        check_number(self.temperature, "temperature", high=1e3)
        if self.batch_size < 1:
            raise DistillError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.quantize not in ("fp16", "uint8"):
            raise DistillError(f"unknown quantize '{self.quantize}'; use fp16 or uint8.")
        if not (isinstance(self.prune, (int, float)) and 0 < self.prune <= 1):
            raise DistillError(f"prune is the fraction of soft labels kept, in (0, 1] (e.g. 0.025 keeps 1 in 40; 1 = "
                               f"all), got {self.prune}.")

    @property
    def stored_epochs(self) -> int:
        """Epochs of crops and labels stored: all of them, or ``ceil(prune x epochs)`` when pruning."""
        return max(1, math.ceil(self.prune * self.epochs - 1e-9))


def epoch_crops(n: int, crop_seed: int, epoch: int, min_scale: float, flip: bool) -> dict[str, torch.Tensor]:
    """The crops of epoch ``epoch`` for ``n`` images: identical in relabel and in student training."""
    from distillset.core.partition import mix_seed

    g = torch.Generator().manual_seed(mix_seed(crop_seed, 7, epoch))
    return sample_crops(n, g, (min_scale, 1.0), flip=flip)


def epoch_crops_range(n: int, crop_seed: int, epoch: int, min_scale: float, flip: bool, start: int, stop: int,
                      piece: int = 8192) -> dict[str, torch.Tensor]:
    """``epoch_crops(n, ...)`` restricted to images ``[start, stop)``, drawn with memory bounded by ``piece``.

    The generator's streams are consumed in the same order and amounts as :func:`epoch_crops` (torch draws uniform
    numbers one after another, so drawing in pieces gives the same numbers); only the slice is kept.
    """
    from distillset.core.partition import mix_seed

    g = torch.Generator().manual_seed(mix_seed(crop_seed, 7, epoch))

    def draw(fn) -> torch.Tensor:
        keep, pos = [], 0
        while pos < n:
            m = min(piece, n - pos)
            v = fn(m)
            lo, hi = max(start, pos), min(stop, pos + m)
            if lo < hi:
                keep.append(v[lo - pos:hi - pos])
            pos += m
        return torch.cat(keep) if keep else torch.empty(0)

    # mirrors squeeze.augment.sample_crops (default ratio (3/4, 4/3)) stream by stream
    area = draw(lambda m: torch.empty(m).uniform_(min_scale, 1.0, generator=g))
    logr = draw(lambda m: torch.empty(m).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (draw(lambda m: torch.rand(m, generator=g)) * 2 - 1) * (1 - w)
    cy = (draw(lambda m: torch.rand(m, generator=g)) * 2 - 1) * (1 - h)
    fl = (draw(lambda m: torch.rand(m, generator=g)) < 0.5) if flip else torch.zeros(stop - start, dtype=torch.bool)
    return {"cx": cx, "cy": cy, "w": w, "h": h, "flip": fl}


def apply_crops(x: torch.Tensor, crops: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    """Apply (a subset ``index`` of) an epoch's crops to the batch ``x``."""
    p = {k: (v if index is None else v[index]).to(x.device) for k, v in crops.items()}
    return affine_crop(x, p["cx"].to(x.dtype), p["cy"].to(x.dtype), p["w"].to(x.dtype), p["h"].to(x.dtype), p["flip"])


@torch.no_grad()
def ensemble_probs(teachers, x: torch.Tensor, temperature: float, amp) -> torch.Tensor:
    probs = None
    for t in teachers:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = t(x)
        p = torch.softmax(logits.float() / temperature, dim=1)
        probs = p if probs is None else probs + p
    return probs / len(teachers)


def compress(probs: torch.Tensor, topk: int, quantize: str = "fp16") -> dict[str, torch.Tensor]:
    """Top-k values (fp16) and indices (uint8/int16) of ``probs`` (N, C); full fp16 values when ``topk`` is 0.

    ``quantize="uint8"`` stores ``round(255 * v / max(v))`` per crop and the maxima as ``scale`` (N,) fp16.
    """
    c = probs.shape[1]
    if topk == 0 or topk >= c:
        out = {"values": probs}
    else:
        v, i = probs.topk(topk, dim=1)
        out = {"values": v, "indices": i.to(torch.uint8 if c <= 256 else torch.int16)}
    if quantize == "uint8":
        scale = out["values"].amax(1).clamp_min(1e-12)
        out["values"] = (out["values"] / scale[:, None] * 255).round().to(torch.uint8)
        out["scale"] = scale.half()
    else:
        out["values"] = out["values"].half()
    return out


def dequantize(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values as float probabilities (undoing the uint8 per-crop scaling when ``scale`` is given)."""
    if scale is None:
        return values.float()
    return values.float() * (scale.float() / 255)[..., None]


def dense_targets(values: torch.Tensor, indices: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Rebuild (N, C) float distributions; the mass outside the top-k is spread uniformly over the other classes."""
    values = values.float()
    if indices is None:
        return values / values.sum(1, keepdim=True)
    k = values.shape[1]
    rest = (1 - values.sum(1, keepdim=True)).clamp_min(0) / max(1, num_classes - k)
    out = rest.expand(-1, num_classes).clone()
    out.scatter_(1, indices.long(), values)
    return out


@dataclass
class SoftLabels:
    """Soft labels of one image set over epochs; ``targets(epoch, index)`` gives dense distributions."""

    values: torch.Tensor  # (E, N, k)
    indices: torch.Tensor | None  # (E, N, k)
    meta: dict
    scale: torch.Tensor | None = None  # (E, N) fp16 when values are uint8-quantised

    @property
    def epochs(self) -> int:
        """Stored epochs (fewer than a student's when the labels are pruned)."""
        return int(self.values.shape[0])

    @property
    def pruned(self) -> bool:
        return float(self.meta.get("prune", 1.0)) < 1

    def check_student_epochs(self, epochs: int) -> None:
        """Pruned labels were drawn for one student length; another length is refused (one line)."""
        want = int(self.meta.get("student_epochs", self.epochs))
        if self.pruned and epochs != want:
            raise DistillError(f"these soft labels are pruned to {self.epochs} of {want} student epochs (prune "
                               f"{self.meta['prune']}); a student of {epochs} epochs would see another label pool: "
                               f"train for {want} epochs (--epochs {want}) or relabel with --epochs {epochs}.")

    def draw(self, epoch: int) -> torch.Tensor:
        """The stored epoch each image uses in student epoch ``epoch``: cyclic (``epoch mod stored``) for full
        labels; for pruned labels a uniform draw per image (LPLD's random pool), a pure function of the crop seed and
        the epoch, so every student of these labels sees the same pairs."""
        n = self.values.shape[1]
        if not self.pruned:
            return torch.full((n,), epoch % self.epochs, dtype=torch.long)
        from distillset.core.partition import mix_seed

        g = torch.Generator().manual_seed(mix_seed(int(self.meta["crop_seed"]), 11, epoch))
        return torch.randint(self.epochs, (n,), generator=g)

    def crops(self, stored: torch.Tensor) -> dict[str, torch.Tensor]:
        """The crops of the (stored epoch, image) pairs ``stored[i], i`` (recomputed from the crop seed)."""
        m = self.meta
        n = self.values.shape[1]
        out: dict[str, torch.Tensor] = {}
        for e in stored.unique().tolist():
            c = epoch_crops(n, int(m["crop_seed"]), e, float(m["min_scale"]), bool(m["flip"]))
            sel = stored == e
            for k, v in c.items():
                if k not in out:
                    out[k] = torch.empty_like(v)
                out[k][sel] = v[sel]
        return out

    def targets(self, epoch: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Dense distributions of images ``index`` in student epoch ``epoch`` (an int: cyclic), or of the stored
        epochs ``epoch`` (a tensor aligned with ``index``, from :meth:`draw`)."""
        e = epoch % self.epochs if isinstance(epoch, int) else epoch
        ind = None if self.indices is None else self.indices[e, index]
        scale = None if self.scale is None else self.scale[e, index]
        return dense_targets(dequantize(self.values[e, index], scale), ind, int(self.meta["num_classes"]))

    def bytes_per_image(self) -> float:
        n = self.values.shape[1]
        total = self.values.numel() * self.values.element_size()
        if self.indices is not None:
            total += self.indices.numel() * self.indices.element_size()
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total / n


def label_chunk(x_uint8: torch.Tensor, start: int, n: int, teachers, cfg: RelabelConfig, device, epochs,
                amp) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(epoch, compressed labels)`` of images ``[start, start + len(x_uint8))`` of an ``n``-image set, per epoch."""
    x_chunk = x_uint8.to(device).float() / 255
    stop = start + len(x_uint8)
    for e in epochs:
        crops = epoch_crops_range(n, cfg.crop_seed, e, cfg.min_scale, cfg.flip, start, stop)
        x = apply_crops(x_chunk, crops)
        yield e, {k: v.cpu() for k, v in compress(ensemble_probs(teachers, x, cfg.temperature, amp), cfg.topk,
                                                  cfg.quantize).items()}


def generate(images: ImageSet, teachers, cfg: RelabelConfig, device, epochs: range | None = None,
             show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Soft labels of ``images`` for ``epochs`` (default all): tensors ``values`` (E, N, k) and maybe ``indices``.

    In memory (the result is returned); :func:`run` streams the same labels straight to files instead.
    """
    amp = autocast_dtype(cfg.autocast, device)
    epochs = epochs if epochs is not None else range(cfg.stored_epochs)
    n = len(images)
    out: dict[str, torch.Tensor] = {}
    for s in progress(range(0, n, cfg.batch_size), desc="relabel", enabled=show_progress):
        for k, (_, c) in enumerate(label_chunk(images.images[s:s + cfg.batch_size], s, n, teachers, cfg, device,
                                               epochs, amp)):
            for name, v in c.items():
                if name not in out:
                    out[name] = torch.empty((len(epochs), n, *v.shape[1:]), dtype=v.dtype)
                out[name][k, s:s + len(v)] = v
    return out


def _label_specs(cfg: RelabelConfig, n_epochs: int, n: int, num_classes: int) -> dict:
    """Shapes and dtypes of one epoch block's tensors (what :func:`compress` returns, stacked over epochs)."""
    k = num_classes if cfg.topk == 0 or cfg.topk >= num_classes else cfg.topk
    specs = {"values": ((n_epochs, n, k), torch.uint8 if cfg.quantize == "uint8" else torch.float16)}
    if k < num_classes:
        specs["indices"] = ((n_epochs, n, k), torch.uint8 if num_classes <= 256 else torch.int16)
    if cfg.quantize == "uint8":
        specs["scale"] = ((n_epochs, n), torch.float16)
    return specs


def write_block(path: Path, folder: str | Path, n: int, num_classes: int, teachers, cfg: RelabelConfig, device,
                epochs: range, show_progress: bool = True) -> None:
    """Labels of one epoch block written as they are made: images streamed in chunks of ``batch_size`` from the
    shards (decoded once per block), memory bounded by the chunk whatever the number of images."""
    from distillset.relabel.stream import TensorFileWriter, iter_distilled

    amp = autocast_dtype(cfg.autocast, device)
    writer = TensorFileWriter(path, _label_specs(cfg, len(epochs), n, num_classes),
                              {"epochs": f"{epochs.start}-{epochs.stop}"})
    try:
        seen = 0
        bar = progress(total=n, desc=f"relabel epochs {epochs.start}-{epochs.stop - 1}", enabled=show_progress)
        for s, x in iter_distilled(folder, cfg.batch_size):
            for k, (_, c) in enumerate(label_chunk(x, s, n, teachers, cfg, device, epochs, amp)):
                for name, v in c.items():
                    writer.write(name, k, s, v)
            seen = s + len(x)
            bar.update(len(x))
        bar.close()
        if seen != n:
            raise DistillError(f"{folder} holds {seen} images but its manifest says {n}; the distilled set is "
                               "inconsistent, re-run recover into a new folder.")
    except BaseException:
        writer.abort()
        raise
    writer.close()


def label_meta(cfg: RelabelConfig, teachers, num_classes: int, n: int) -> dict:
    return {"num_classes": num_classes, "num_images": n, "topk": cfg.topk, "temperature": cfg.temperature,
            "min_scale": cfg.min_scale, "flip": cfg.flip, "crop_seed": cfg.crop_seed, "epochs": cfg.stored_epochs,
            "teachers": [t.describe() for t in teachers],
            **({"quantize": cfg.quantize} if cfg.quantize != "fp16" else {}),  # absent = fp16 (older label folders)
            **({"prune": cfg.prune, "student_epochs": cfg.epochs} if cfg.prune < 1 else {})}


def config_from_meta(m: dict) -> RelabelConfig:
    """The relabel settings a ``labels.json`` records (to label another set, e.g. the random baseline, alike)."""
    return RelabelConfig(epochs=int(m.get("student_epochs", m["epochs"])), topk=int(m["topk"]),
                         temperature=float(m["temperature"]), min_scale=float(m["min_scale"]), flip=bool(m["flip"]),
                         crop_seed=int(m["crop_seed"]), quantize=m.get("quantize", "fp16"),
                         prune=float(m.get("prune", 1.0)))


def load_soft_labels(folder: str | Path) -> SoftLabels:
    """Read ``labels/`` of a distilled set (all epoch files, concatenated)."""
    from distillset.core.io import read_json

    folder = Path(folder) / "labels"
    meta_path = folder / "labels.json"
    if not meta_path.exists():
        raise DistillError(f"{folder.parent} has no soft labels; run `distillset relabel --distilled {folder.parent}`.")
    return read_label_files(folder, read_json(meta_path))


def label_files(folder: Path, meta: dict) -> list[Path]:
    """The soft-label files ``labels.json`` announces, all present (their count is bounded by what the folder
    holds, never taken from the file alone)."""
    n = meta.get("files")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DistillError(f"{folder}/labels.json has no valid 'files' count ({n!r}); delete {folder} and relabel.")
    present = len(list(folder.glob("soft-*.safetensors")))
    for i in range(min(n, present + 1)):  # at most present + 1 names to find the first missing one
        f = folder / f"soft-{i:06d}.safetensors"
        if not f.is_file():
            raise DistillError(f"soft-label file {f} is missing; re-run the same relabel command to finish.")
    return [folder / f"soft-{i:06d}.safetensors" for i in range(n)]


def read_label_files(folder: Path, meta: dict) -> SoftLabels:
    files = label_files(folder, meta)
    parts = [load_tensors(f) for f in files]
    values = torch.cat([p["values"] for p in parts])
    indices = torch.cat([p["indices"] for p in parts]) if "indices" in parts[0] else None
    scale = torch.cat([p["scale"] for p in parts]) if "scale" in parts[0] else None
    return SoftLabels(values, indices, meta, scale)


def run(cfg: RelabelConfig, rt=None) -> dict:
    """Relabel a distilled set; epoch blocks are split across processes and skipped when already written."""
    from distillset.core.distilled import read_manifest
    from distillset.relabel.stream import count_images
    from distillset.squeeze.checkpoint import load_recorded_teacher, load_teacher

    rt = rt or get_runtime()
    manifest = read_manifest(cfg.distilled)
    if manifest.get("status") != "complete":
        raise DistillError(f"{cfg.distilled} is an unfinished run (status {manifest.get('status')}); re-run the same "
                           "recover command to finish it.")
    num_classes, n = len(manifest["class_names"]), count_images(cfg.distilled)
    recorded = manifest.get("teachers", [])
    if not cfg.teachers and not recorded:
        raise DistillError(f"no teacher to relabel {cfg.distilled} with; pass --teachers PATH.")
    teachers = ([load_teacher(s, num_classes, rt.device) for s in cfg.teachers] if cfg.teachers else
                [load_recorded_teacher(t, f"{cfg.distilled}/manifest.json", num_classes, rt.device) for t in recorded])
    folder = Path(cfg.distilled) / "labels"
    meta = label_meta(cfg, teachers, num_classes, n)
    stored = cfg.stored_epochs
    blocks = [range(s, min(stored, s + cfg.epochs_per_file)) for s in range(0, stored, cfg.epochs_per_file)]
    meta["files"] = len(blocks)
    meta_path = folder / "labels.json"
    if meta_path.exists():
        from distillset.core.io import read_json

        old = read_json(meta_path)
        if {k: v for k, v in old.items() if k != "bytes_per_image"} != json_roundtrip(meta):
            raise DistillError(f"{folder} holds soft labels made with other settings; delete it to relabel.")
    elif rt.is_main:
        write_json(meta_path, meta)  # first: a killed run resumes only with the same settings
    rt.wait()
    t0 = time.perf_counter()
    for b, epochs in enumerate(blocks):
        path = folder / f"soft-{b:06d}.safetensors"
        if b % rt.world != rt.rank or path.exists():
            continue
        write_block(path, cfg.distilled, n, num_classes, teachers, cfg, rt.device, epochs, show_progress=rt.is_main)
    rt.wait()
    result = {"bytes_per_image": label_bytes(folder, meta) / max(1, n), "seconds": time.perf_counter() - t0,
              "images": n, "epochs": cfg.epochs, "stored_epochs": stored, "topk": cfg.topk}
    if rt.is_main:
        write_json(meta_path, {**meta, "bytes_per_image": result["bytes_per_image"]})
        log.info("relabel: %d images x %d epochs (%d stored), %.0f bytes per image (top-%d), %.1fs", n, cfg.epochs,
                 stored, result["bytes_per_image"], cfg.topk, result["seconds"])
    rt.wait()
    return result


def label_bytes(folder: Path, meta: dict) -> int:
    """Bytes of all stored label tensors, read from the files' headers (the labels are not loaded)."""
    from distillset.relabel.stream import tensor_file_shapes

    files = label_files(folder, meta)
    return sum(nbytes for f in files for _, nbytes in tensor_file_shapes(f).values())


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj, default=str))
