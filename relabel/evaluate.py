"""``distillset evaluate``: fresh students on a distilled set vs random real images at the same IPC, same protocol.

For each student architecture, each image set (``distilled``, ``random``: ipc random real training images per class)
and each label mode (``hard``; ``soft``: KD from stored soft labels, the random set relabelled in memory with the
same teacher and settings), ``students`` seeds are trained and top-1 on the real test split is reported as
mean +- std. Also reported: the teacher's full-data accuracy and DD-Ranking's IOR/HLR. Writes ``metrics.json`` and
``metrics.csv`` into ``out``. Students are spread over processes when launched with several.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillset.core.config import to_dict, write_config
from distillset.core.data import ImageSet, Source, resize_uint8
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, load_tensors, write_json
from distillset.core.runtime import get_runtime
from distillset.relabel.softlabels import RelabelConfig, SoftLabels, generate, label_meta, load_soft_labels
from distillset.relabel.student import StudentSpec, train_student
from distillset.recover.real import init_order
from distillset.squeeze.inputs import ZCA

log = logging.getLogger("distillset.evaluate")


@dataclass
class EvaluateConfig:
    """Evaluate a distilled set beside random real images at the same IPC.

    Attributes:
        distilled: the distilled-set folder.
        out: where metrics.json / metrics.csv go (default: DISTILLED/eval).
        data: the real data (test split; random-real baseline); default: the source recorded in the manifest.
        archs: student architectures (default: the teacher's architecture, or convnet for teacher-free methods).
        model_kwargs: extra keyword arguments of the student architectures.
        students: students (seeds) per setting.
        epochs: student training epochs (soft labels cover at most as many epochs as relabel stored; they repeat).
        protocol: sre2l (AdamW + KD) or matching (SGD + DSA, lr x0.1 at half).
        labels: hard, soft or both.
        baseline: also train on random real images at the same IPC.
        teachers: teachers for relabelling the random baseline (default: those of the soft labels).
        batch_size: student batch size.
        lr: student learning rate (default: the protocol's, or the learned lr of MTT/DATM).
        min_scale: crop lower bound for hard-label training under the sre2l protocol.
        flip: horizontal flips for hard-label training.
        seed: base seed of the students (the random baseline takes the distilled set's own seed: the real images an
            init-from-real run started from).
    """

    distilled: str = "output/recover"
    out: str = ""
    data: str = ""
    archs: list[str] = field(default_factory=list)
    model_kwargs: dict = field(default_factory=dict)
    students: int = 3
    epochs: int = 300
    protocol: str = "sre2l"
    labels: str = "both"
    baseline: bool = True
    teachers: list[str] = field(default_factory=list)
    batch_size: int = 64
    lr: float = 0.0
    min_scale: float = 0.08
    flip: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.labels not in ("hard", "soft", "both"):
            raise DistillError(f"unknown labels '{self.labels}'; use hard, soft or both.")
        if self.protocol not in ("sre2l", "matching"):
            raise DistillError(f"unknown protocol '{self.protocol}'; use sre2l or matching.")
        if self.students < 1 or self.epochs < 1:
            raise DistillError("students and epochs must be >= 1.")


def random_subset(train: ImageSet, ipc: int, seed: int, num_classes: int) -> ImageSet:
    """``ipc`` random real images per class (a pure function of the seed), ordered by class: the images a recover
    run with this seed starts from when it initialises from real images (and its ``random`` method picks)."""
    idx = []
    for c in range(num_classes):
        pool = torch.nonzero(train.labels == c).flatten()
        if len(pool) < ipc:
            raise DistillError(f"class '{train.class_names[c]}' has {len(pool)} real images, fewer than ipc {ipc}; "
                               "lower ipc.")
        idx.append(init_order(pool, c, seed)[:ipc])
    return train.subset(torch.cat(idx))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def learned_params(folder: Path) -> dict[str, torch.Tensor]:
    """Learned lr / soft labels saved by MTT-family methods (``params/``), if any."""
    parts = [load_tensors(f) for f in sorted((folder / "params").glob("unit-*.safetensors"))]
    if not parts:
        return {}
    out = {}
    for k, first in parts[0].items():
        # per-image tensors (DATM's soft labels) follow the units' order; a scalar (MTT's lr) is one for the set
        out[k] = torch.cat([p[k] for p in parts]) if first.ndim else first
    return out


def dd_ranking(full: float | None, hard: float | None, hard_random: float | None, soft: float | None,
               soft_random: float | None) -> dict:
    """DD-Ranking's improvement over random (IOR), hard-label recovery (HLR) and label-robust score (LRS)."""
    out = {}
    best = soft if soft is not None else hard
    best_random = soft_random if soft is not None else hard_random
    if best is not None and best_random is not None:
        out["IOR"] = best - best_random
    if full is not None and hard is not None:
        out["HLR"] = full - hard
    if "IOR" in out and "HLR" in out:
        alpha = 0.5 * out["IOR"] - 0.5 * out["HLR"]
        out["LRS"] = (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))
    return out


def run(cfg: EvaluateConfig, rt=None) -> dict:
    from distillset.core.io import inside
    from distillset.squeeze.checkpoint import load_recorded_teacher, load_teacher

    rt = rt or get_runtime()
    t0 = time.perf_counter()
    folder = Path(cfg.distilled)
    distilled, manifest = load_distilled(folder)
    out = Path(cfg.out or folder / "eval")
    data = cfg.data or manifest.get("data")
    if not data:
        raise DistillError(f"{folder} does not record its data source; pass --data SPEC for the test split.")
    source = Source(data)
    size = distilled.image_shape[-1]

    def fit(s: ImageSet) -> ImageSet:
        return s if s.image_shape[-1] == size else ImageSet(resize_uint8(s.images, size), s.labels, s.class_names)

    test = fit(source.load("test"))
    keep = test.labels < distilled.num_classes
    test = test.subset(torch.nonzero(keep).flatten())
    ipc = int(manifest["ipc"])
    mean, std = manifest.get("mean") or [0.5] * distilled.image_shape[0], manifest.get("std")
    std = std or [0.5] * distilled.image_shape[0]
    zca_path = inside(folder, manifest["zca"], "manifest.json 'zca'", must_exist=True) if manifest.get("zca") \
        else None
    zca = ZCA.load(zca_path) if zca_path else None  # distilled in whitened space
    if zca is not None:
        log.info("evaluate: students see ZCA-whitened inputs (%s), as the set was distilled", zca_path)
    teachers_info = manifest.get("teachers", [])
    soft = None
    if cfg.labels in ("soft", "both"):
        if (folder / "labels" / "labels.json").exists():
            soft = load_soft_labels(folder)
        elif cfg.labels == "soft":
            raise DistillError(f"{folder} has no soft labels; run `distillset relabel --distilled {folder}` first.")
    learned = learned_params(folder)
    archs = cfg.archs
    model_kwargs = cfg.model_kwargs
    full = None
    if teachers_info:
        t = load_recorded_teacher(teachers_info[0], f"{folder}/manifest.json", distilled.num_classes)
        archs = archs or [t.config.arch]
        model_kwargs = model_kwargs or t.config.model_kwargs
        full = t.config.metrics.get("test_top1")
    archs = archs or ["convnet"]

    sets: dict[str, tuple[ImageSet, SoftLabels | None]] = {"distilled": (distilled, soft)}
    if cfg.baseline:
        # the images an init-from-real run of this set started from: distilled vs random shows what distilling added
        rand_seed = int(manifest.get("seeds", {}).get("base", cfg.seed))
        rand = random_subset(fit(source.load("train")), ipc, rand_seed, distilled.num_classes)
        rand_soft = None
        if soft is not None:
            teachers = ([load_teacher(s, distilled.num_classes, rt.device) for s in cfg.teachers] if cfg.teachers
                        else [load_recorded_teacher(t, f"{folder}/labels/labels.json", distilled.num_classes,
                                                    rt.device) for t in soft.meta["teachers"]])
            m = soft.meta
            rcfg = RelabelConfig(epochs=int(m["epochs"]), topk=int(m["topk"]), temperature=float(m["temperature"]),
                                 min_scale=float(m["min_scale"]), flip=bool(m["flip"]), crop_seed=int(m["crop_seed"]),
                                 quantize=m.get("quantize", "fp16"))
            tensors = generate(rand, teachers, rcfg, rt.device, show_progress=False)
            rand_soft = SoftLabels(tensors["values"], tensors.get("indices"),
                                   label_meta(rcfg, teachers, distilled.num_classes, len(rand)), tensors.get("scale"))
        sets["random"] = (rand, rand_soft)

    jobs = []
    for arch in archs:
        for name, (images, labels) in sets.items():
            modes = [m for m in ("hard", "soft") if cfg.labels in (m, "both")]
            for mode in modes:
                if mode == "soft" and labels is None and not (name == "distilled" and "soft_labels" in learned):
                    continue
                for k in range(cfg.students):
                    jobs.append((arch, name, mode, k))
    results = []
    for j, (arch, name, mode, k) in enumerate(jobs):
        if j % rt.world != rt.rank:
            continue
        images, labels = sets[name]
        lr = cfg.lr or (float(learned["lr"].reshape(-1)[0]) if name == "distilled" and "lr" in learned else None)
        spec = StudentSpec(arch, model_kwargs if arch == archs[0] else cfg.model_kwargs, cfg.epochs, cfg.protocol,
                           cfg.batch_size, lr, min_scale=cfg.min_scale, flip=cfg.flip)
        soft_targets = None
        if mode == "soft" and labels is None:  # DATM-style learned soft labels (logits) of the distilled set
            soft_targets = torch.softmax(learned["soft_labels"].float(), 1).to(rt.device)
        acc = train_student(images, test, spec, mean, std, cfg.seed + 1000 * k, rt.device,
                            soft=labels if mode == "soft" else None, soft_targets=soft_targets, zca=zca)
        results.append({"arch": arch, "set": name, "labels": mode, "seed": cfg.seed + 1000 * k, "top1": acc})
        log.info("evaluate: %s %s %s student %d: top-1 %.4f", arch, name, mode, k, acc)
    results = [r for part in rt.gather_object(results) for r in part]
    summary = []
    for arch in archs:
        for name in sets:
            for mode in ("hard", "soft"):
                accs = [r["top1"] for r in results if (r["arch"], r["set"], r["labels"]) == (arch, name, mode)]
                if accs:
                    mu, sd = mean_std(accs)
                    summary.append({"arch": arch, "set": name, "labels": mode, "mean": mu, "std": sd,
                                    "n": len(accs), "accs": accs})

    def get(name, mode):
        return next((s["mean"] for s in summary if (s["arch"], s["set"], s["labels"]) == (archs[0], name, mode)),
                    None)

    metrics = {
        "ipc": ipc, "num_classes": distilled.num_classes, "protocol": cfg.protocol, "epochs": cfg.epochs,
        "full_data_top1": full, "summary": summary, "runs": results, "zca": zca is not None,
        "soft_label_bytes_per_image": soft.bytes_per_image() if soft is not None else None,
        "dd_ranking": dd_ranking(full, get("distilled", "hard"), get("random", "hard"), get("distilled", "soft"),
                                 get("random", "soft")),
        "seconds": time.perf_counter() - t0, "config": to_dict(cfg),
    }
    if rt.is_main:
        write_json(out / "metrics.json", metrics)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["arch", "set", "labels", "mean", "std", "n"])
        for s in summary:
            w.writerow([s["arch"], s["set"], s["labels"], f"{s['mean']:.4f}", f"{s['std']:.4f}", s["n"]])
        with atomic_path(out / "metrics.csv") as tmp:
            tmp.write_text(buf.getvalue())
        write_config(out, cfg)
        log.info("evaluate:\n%s", format_summary(metrics))
    rt.wait()
    return metrics


def format_summary(metrics: dict) -> str:
    lines = [f"{'arch':<16} {'set':<10} {'labels':<6} {'top-1 (mean +- std)':>22}"]
    for s in metrics["summary"]:
        lines.append(f"{s['arch']:<16} {s['set']:<10} {s['labels']:<6} "
                     f"{100 * s['mean']:>13.2f} +- {100 * s['std']:.2f}  (n={s['n']})")
    return "\n".join(lines)
