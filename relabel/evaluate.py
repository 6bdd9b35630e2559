"""``distillset evaluate``: fresh students on a distilled set vs random real images at the same IPC, same protocol.

For each student architecture, each image set (``distilled``, ``random``: ipc random real training images per class)
and each label mode (``hard``; ``soft``: KD from stored soft labels, the random set relabelled in memory with the
same teacher and settings), ``students`` seeds are trained and top-1 on the real test split is reported as
mean +- std. Also reported: the teacher's full-data accuracy and DD-Ranking's IOR/HLR. Writes ``metrics.json`` and
``metrics.csv`` into ``out``. Students are spread over processes when launched with several.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillset.core.config import check_number, to_dict, write_config
from distillset.core.data import ImageSet, Source, resize_uint8
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, load_tensors, require_folder, write_json
from distillset.core.partition import init_order
from distillset.core.runtime import get_runtime, progress
from distillset.relabel.cohort import cohorts, fit_students, pays_off, small_student, widens
from distillset.relabel.diversity import within_class_diversity
from distillset.relabel.evaluators import EVALUATORS, register_evaluator
from distillset.relabel.softlabels import SoftLabels, config_from_meta, generate, label_meta, load_soft_labels
from distillset.relabel.student import PROTOCOLS, StudentSpec, check_lr_zeta, train_student
from distillset.squeeze.data import evaluate_model
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
        model_kwargs: keyword arguments of every student architecture (e.g. width); when not given, the teacher's
            architecture gets the teacher's own and other architectures none. ``{}`` means none for all.
        students: students (seeds) per setting.
        epochs: student training epochs (soft labels cover at most as many epochs as relabel stored; they repeat).
        protocol: sre2l (AdamW + KD), matching (SGD + DSA, lr x0.1 at half) or plain (matching without augmentation).
        labels: hard, soft or both.
        baseline: also train on random real images at the same IPC.
        teachers: teachers for relabelling the random baseline (default: those of the soft labels).
        batch_size: student batch size.
        lr: student learning rate (default: the protocol's, or the learned lr of MTT/DATM).
        min_scale: crop lower bound for hard-label training under the sre2l protocol.
        flip: horizontal flips for hard-label training.
        seed: base seed of the students (the random baseline takes the distilled set's own seed: the real images an
            init-from-real run started from).
        evaluators: measurements taken beside the students' accuracy (``distillset methods`` lists the registered
            evaluators), stored in metrics.json under their names.
        batch_students: students trained together as one wide network (:mod:`distillset.relabel.cohort`; the seeds
            and both sets of one architecture, each equal to training it alone up to float rounding): 0 = automatic
            (cohorts of up to 16 where it is faster: always on an accelerator, on a CPU for small students), 1 = one
            at a time, k = cohorts of at most k. A killed cohort is retrained whole; finished students are kept.
        compile_students: always run the students through ``torch.compile`` (otherwise see
            ``compile_min_steps``).
        compile_min_steps: compile the students of an architecture when the evaluation trains them for at least
            this many optimiser steps in all (students x epochs x batches per epoch) and they are large enough to
            gain: always on an accelerator, on a CPU when a step's first layer has more than 2^20 activations (the
            32 px ConvNet-3 at batch 100: 2.8x per step for ~35 s of compiling on a 2-core CPU; the digits' small
            students would not gain); 0 = only with ``compile_students``. A compile failure warns once and runs
            eager.
        lr_zeta: EDC's smoothing learning-rate schedule (sre2l protocol): the students' cosine runs over zeta x
            their steps, so it ends at (1 + cos(pi / zeta)) / 2 of the lr instead of 0 (2: half); 1 = plain cosine.
            With EDC's small-batch evaluation, lower batch_size too.
    """

    distilled: str = "output/recover"
    out: str = ""
    data: str = ""
    archs: list[str] = field(default_factory=list)
    model_kwargs: dict | None = None
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
    evaluators: list[str] = field(default_factory=lambda: ["diversity"])
    batch_students: int = 0
    compile_students: bool = False
    compile_min_steps: int = 2000
    lr_zeta: float = 1.0

    def __post_init__(self):
        for name in self.evaluators:
            EVALUATORS.get(name)  # an unknown evaluator is a one-line error before any work
        if self.labels not in ("hard", "soft", "both"):
            raise DistillError(f"unknown labels '{self.labels}'; use hard, soft or both.")
        if self.protocol not in PROTOCOLS:
            raise DistillError(f"unknown protocol '{self.protocol}'; use {', '.join(PROTOCOLS)}.")
        if self.students < 1 or self.epochs < 1 or self.batch_size < 1:
            raise DistillError("students, epochs and batch_size must be >= 1.")
        if self.compile_min_steps < 0:
            raise DistillError(f"compile_min_steps must be >= 0 (0 = only with --compile-students true), got "
                               f"{self.compile_min_steps}.")
        if self.batch_students < 0:
            raise DistillError(f"batch_students must be >= 0 (0 = automatic, 1 = one at a time), got "
                               f"{self.batch_students}.")
        check_number(self.lr, "lr (0 = the protocol's)", high=1e4, allow_low=True)
        check_lr_zeta(self.lr_zeta, self.protocol)
        if not 0 < self.min_scale <= 1:
            raise DistillError(f"min_scale must be in (0, 1], got {self.min_scale}.")


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


@dataclass
class Job:
    """One student: architecture, image set, label mode and seed (its result is cached under ``key``)."""

    arch: str
    set: str
    labels: str
    seed: int

    @property
    def key(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.arch)
        return f"{safe}__{self.set}__{self.labels}__seed{self.seed}"


@dataclass
class Plan:
    """Everything an evaluation needs, read and checked before any student is trained or any label computed."""

    folder: Path
    out: Path
    distilled: ImageSet
    manifest: dict
    source: Source
    test: ImageSet
    ipc: int
    mean: list[float]
    std: list[float]
    zca: ZCA | None
    soft: SoftLabels | None
    learned: dict[str, torch.Tensor]
    full: float | None
    archs: list[str]
    model_kwargs: dict[str, dict]
    relabel_teachers: list[str | dict]  # --teachers specs, or labels.json records (loaded only if unchanged)
    jobs: list[Job]
    fingerprint: str
    teacher: object = None  # the set's first teacher (diversity in its feature space), when it has one
    compiled_archs: frozenset = frozenset()  # architectures whose students run compiled (set by students())
    random: ImageSet | None = None  # the random-real baseline, drawn once (students and evaluators share it)

    def fit(self, s: ImageSet) -> ImageSet:
        return plan_fit(s, self.distilled.image_shape[-1])


def student_kwargs(archs: list[str], given: dict | None, teacher_arch: str | None, teacher_kwargs: dict) -> dict:
    """Model kwargs per student architecture: ``--model-kwargs`` when given (even ``{}``) for every arch; otherwise
    the teacher's kwargs for the teacher's own architecture and none for the others (they were made for it)."""
    if given is not None:
        return {a: dict(given) for a in archs}
    return {a: dict(teacher_kwargs) if a == teacher_arch else {} for a in archs}


def _check_arch(arch: str, kwargs: dict, num_classes: int, image_shape: tuple[int, int, int]) -> None:
    """Build the student once (CPU, random weights) so a wrong name or keyword fails before any work."""
    from distillset.squeeze.models import create_model, model_entry

    model_entry(arch)  # unknown names: the registry's own one-line error
    try:
        create_model(arch, num_classes, image_shape[0], image_shape[-1], **kwargs)
    except TypeError as e:  # a keyword the architecture's constructor does not take
        raise DistillError(f"student arch '{arch}' does not take model_kwargs {kwargs} ({e}); pass --model-kwargs "
                           "with that architecture's own options (or '{}').") from None


def plan(cfg: EvaluateConfig, rt) -> Plan:
    """Read the set, the test split, labels and teachers; resolve archs and their kwargs; list the students."""
    from distillset.core.io import inside
    from distillset.squeeze.checkpoint import load_recorded_teacher

    folder = Path(cfg.distilled)
    distilled, manifest = load_distilled(folder)
    out = require_folder(cfg.out or folder / "eval")
    data = cfg.data or manifest.get("data")
    if not data:
        raise DistillError(f"{folder} does not record its data source; pass --data SPEC for the test split.")
    source = Source(data)
    c = distilled.image_shape[0]
    mean, std = manifest.get("mean") or [0.5] * c, manifest.get("std") or [0.5] * c
    zca = ZCA.load(inside(folder, manifest["zca"], "manifest.json 'zca'", must_exist=True)) if manifest.get("zca") \
        else None  # distilled in whitened space
    soft = None
    if cfg.labels in ("soft", "both"):
        if (folder / "labels" / "labels.json").exists():
            soft = load_soft_labels(folder)
        elif cfg.labels == "soft":
            raise DistillError(f"{folder} has no soft labels; run `distillset relabel --distilled {folder}` first.")
        if soft is not None:
            soft.check_student_epochs(cfg.epochs)  # pruned labels hold one student length's pool
    learned = learned_params(folder)
    teachers_info = manifest.get("teachers", [])
    full, teacher_arch, teacher_kwargs, t = None, None, {}, None
    if teachers_info:
        t = load_recorded_teacher(teachers_info[0], f"{folder}/manifest.json", distilled.num_classes)
        teacher_arch, teacher_kwargs = t.config.arch, t.config.model_kwargs or {}
        full = t.config.metrics.get("test_top1")
    archs = cfg.archs or [teacher_arch or "convnet"]
    kwargs = student_kwargs(archs, cfg.model_kwargs, teacher_arch, teacher_kwargs)
    for arch in archs:
        _check_arch(arch, kwargs[arch], distilled.num_classes, distilled.image_shape)
    test = plan_fit(source.load("test"), distilled.image_shape[-1])
    test = test.subset(torch.nonzero(test.labels < distilled.num_classes).flatten())
    if test.image_shape[0] != c:
        raise DistillError(f"the test images of '{data}' have {test.image_shape[0]} channels but the distilled set "
                           f"has {c}; evaluate on the data the set was distilled from.")
    relabel_teachers = []
    sets = ["distilled"]
    if cfg.baseline:
        sets.append("random")
        if soft is not None:
            relabel_teachers = list(cfg.teachers) or list(soft.meta["teachers"])
            for spec in relabel_teachers:  # loadable, unchanged and of the right classes, before any work
                _relabel_teacher(spec, folder, distilled.num_classes)
    jobs = []
    for arch in archs:
        for name in sets:
            for mode in (m for m in ("hard", "soft") if cfg.labels in (m, "both")):
                has_labels = soft is not None or (name == "distilled" and "soft_labels" in learned)
                if mode == "soft" and not has_labels:
                    continue
                jobs += [Job(arch, name, mode, cfg.seed + 1000 * k) for k in range(cfg.students)]
    # what changes a student's result (evaluators only measure the set: students recorded before they existed stay
    # valid; a cohort member equals its lone twin, so batch_students does not either)
    key = {"config": {k: v for k, v in to_dict(cfg).items()
                      if k not in ("out", "students", "evaluators", "batch_students", "compile_students",
                                   "compile_min_steps")
                      and not (k == "lr_zeta" and v == 1.0)},  # results recorded before the option stay valid
           "set": manifest.get("fingerprint"), "num_images": len(distilled), "model_kwargs": kwargs,
           "soft": soft.meta if soft is not None else None}
    fp = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Plan(folder, out, distilled, manifest, source, test, int(manifest["ipc"]), mean, std, zca, soft, learned,
                full, archs, kwargs, relabel_teachers, jobs, fp, t)


def plan_fit(s: ImageSet, size: int) -> ImageSet:
    """``s`` resized to the distilled set's resolution (students train and test at one size)."""
    return s if s.image_shape[-1] == size else ImageSet(resize_uint8(s.images, size), s.labels, s.class_names)


def student_path(p: Plan, job: Job) -> Path:
    return p.out / "students" / f"{job.key}.json"


def finished_student(p: Plan, job: Job) -> float | None:
    """The top-1 a previous run of this evaluation (same fingerprint) recorded for ``job``, if any."""
    path = student_path(p, job)
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:  # a record is written atomically; a damaged one is simply redone
        return None
    return float(rec["top1"]) if rec.get("fingerprint") == p.fingerprint else None


def _relabel_teacher(spec: str | dict, folder: Path, num_classes: int, device="cpu"):
    """A teacher for relabelling the random baseline: a ``--teachers`` spec as given, or a labels.json record
    loaded only if its weights are still the recorded ones."""
    from distillset.squeeze.checkpoint import load_recorded_teacher, load_teacher

    if isinstance(spec, dict):
        return load_recorded_teacher(spec, f"{folder}/labels/labels.json", num_classes, device)
    return load_teacher(spec, num_classes, device)


def random_set(p: Plan, cfg: EvaluateConfig) -> ImageSet:
    """The random real images at the same IPC: those an init-from-real run of this set started from."""
    if p.random is None:
        rand_seed = int(p.manifest.get("seeds", {}).get("base", cfg.seed))
        p.random = random_subset(p.fit(p.source.load("train")), p.ipc, rand_seed, p.distilled.num_classes)
    return p.random


@register_evaluator("diversity", description="within-class mean pairwise distance of the distilled set and of the "
                    "random real baseline, in pixels and in the teacher's feature space")
def diversity(p: Plan, cfg: EvaluateConfig, rt=None) -> dict:
    """Within-class diversity of the distilled set and of the random real baseline (pixels, teacher features)."""
    out = {"distilled": within_class_diversity(p.distilled, p.teacher)}
    if cfg.baseline:
        out["random"] = within_class_diversity(random_set(p, cfg), p.teacher)
    return out


def baseline(p: Plan, cfg: EvaluateConfig, rt, need_soft: bool) -> tuple[ImageSet, SoftLabels | None]:
    """The random-real set at the same IPC, relabelled with the set's teachers when a pending student needs it."""
    # the images an init-from-real run of this set started from: distilled vs random shows what distilling added
    rand = random_set(p, cfg)
    if p.soft is None or not need_soft:
        return rand, None
    teachers = [_relabel_teacher(s, p.folder, p.distilled.num_classes, rt.device) for s in p.relabel_teachers]
    rcfg = config_from_meta(p.soft.meta)
    tensors = generate(rand, teachers, rcfg, rt.device, show_progress=False)
    return rand, SoftLabels(tensors["values"], tensors.get("indices"),
                            label_meta(rcfg, teachers, p.distilled.num_classes, len(rand)), tensors.get("scale"))


def student_spec(p: Plan, cfg: EvaluateConfig, job: Job) -> StudentSpec:
    """The recipe of ``job``'s student (the distilled set's learned lr, when MTT/DATM stored one)."""
    learned_lr = job.set == "distilled" and "lr" in p.learned
    lr = cfg.lr or (float(p.learned["lr"].reshape(-1)[0]) if learned_lr else None)
    return StudentSpec(job.arch, p.model_kwargs[job.arch], cfg.epochs, cfg.protocol, cfg.batch_size, lr,
                       min_scale=cfg.min_scale, flip=cfg.flip,
                       compile=cfg.compile_students or job.arch in p.compiled_archs, lr_zeta=cfg.lr_zeta)


def compiled_archs(p: Plan, cfg: EvaluateConfig, jobs: list[Job], device) -> frozenset:
    """The architectures whose students compile by ``compile_min_steps`` (see :class:`EvaluateConfig`)."""
    from distillset.squeeze.models import create_model

    if not cfg.compile_min_steps:
        return frozenset()
    n = len(p.distilled)
    per_student = cfg.epochs * math.ceil(n / cfg.batch_size)
    out = set()
    for arch in {j.arch for j in jobs}:
        if sum(j.arch == arch for j in jobs) * per_student < cfg.compile_min_steps:
            continue
        probe = create_model(arch, p.distilled.num_classes, p.distilled.image_shape[0], p.distilled.image_shape[-1],
                             **p.model_kwargs[arch])
        if torch.device(device).type != "cpu" or not small_student(probe, min(n, cfg.batch_size),
                                                                   p.distilled.image_shape[-1]):
            out.add(arch)
    if out:
        log.info("evaluate: students of %s run through torch.compile (compile_min_steps %d)", ", ".join(sorted(out)),
                 cfg.compile_min_steps)
    return frozenset(out)


def job_labels(p: Plan, job: Job, labels: SoftLabels | None, device) -> tuple[SoftLabels | None, torch.Tensor | None]:
    """``(stored soft labels, fixed soft targets)`` of ``job``: KD labels, DATM's learned labels, or neither."""
    if job.labels != "soft":
        return None, None
    if labels is None:  # DATM-style learned soft labels (logits) of the distilled set
        return None, torch.softmax(p.learned["soft_labels"].float(), 1).to(device)
    return labels, None


def record_student(p: Plan, job: Job, acc: float) -> None:
    """A student's top-1, recorded at once (atomically), so a killed run keeps it."""
    write_json(student_path(p, job), {"fingerprint": p.fingerprint, **dataclasses.asdict(job), "top1": acc})


def train_one(p: Plan, cfg: EvaluateConfig, job: Job, images: ImageSet, labels: SoftLabels | None, rt,
              on_epoch=None) -> float:
    """Train the student of ``job`` alone and record its top-1."""
    soft, soft_targets = job_labels(p, job, labels, rt.device)
    acc = train_student(images, p.test, student_spec(p, cfg, job), p.mean, p.std, job.seed, rt.device, soft=soft,
                        soft_targets=soft_targets, zca=p.zca, on_epoch=on_epoch)
    record_student(p, job, acc)
    return acc


def train_cohort(p: Plan, cfg: EvaluateConfig, jobs: list[Job], sets: dict, rt, on_epoch=None) -> list[float]:
    """Train the students of ``jobs`` (one recipe) together and record each one's top-1 as it comes."""
    spec = student_spec(p, cfg, jobs[0])
    members = [(sets[j.set][0], *job_labels(p, j, sets[j.set][1], rt.device)) for j in jobs]
    models = fit_students(members, spec, p.mean, p.std, [j.seed for j in jobs], rt.device, zca=p.zca,
                          on_epoch=on_epoch)
    accs = []
    for job, model in zip(jobs, models):
        accs.append(evaluate_model(model, p.test, p.mean, p.std, rt.device, zca=p.zca))
        record_student(p, job, accs[-1])
    return accs


def plan_cohorts(p: Plan, cfg: EvaluateConfig, pending: list[Job], sets: dict, device) -> list[list[Job]]:
    """``pending`` in groups trained together: jobs of one recipe and set size, where a cohort pays off
    (``batch_students``); every other job is a group of one."""
    from distillset.squeeze.models import create_model

    limit = cfg.batch_students or 16
    by_recipe: dict[tuple, list[Job]] = {}
    for job in pending:
        by_recipe.setdefault((repr(student_spec(p, cfg, job)), len(sets[job.set][0])), []).append(job)
    groups = []
    for jobs in by_recipe.values():
        probe = create_model(jobs[0].arch, p.distilled.num_classes, p.distilled.image_shape[0],
                             p.distilled.image_shape[-1], **p.model_kwargs[jobs[0].arch])
        n = len(sets[jobs[0].set][0])
        wide = widens(probe) if cfg.batch_students else pays_off(probe, min(n, cfg.batch_size),
                                                                 p.distilled.image_shape[-1], device)
        if limit == 1 or len(jobs) == 1 or not wide:
            groups += [[j] for j in jobs]
        else:
            groups += [[jobs[i] for i in part] for part in cohorts(len(jobs), limit)]
    return groups


def students(p: Plan, cfg: EvaluateConfig, rt) -> list[dict]:
    """Every student of the plan (this rank's share trained, or read back when a previous run finished it)."""
    mine = [job for j, job in enumerate(p.jobs) if j % rt.world == rt.rank]
    done = {job.key: finished_student(p, job) for job in mine}
    pending = [job for job in mine if done[job.key] is None]
    if len(pending) < len(mine):
        log.info("evaluate: %d of %d students already finished in %s", len(mine) - len(pending), len(mine), p.out)
    sets: dict[str, tuple[ImageSet, SoftLabels | None]] = {"distilled": (p.distilled, p.soft)}
    if any(job.set == "random" for job in pending):
        sets["random"] = baseline(p, cfg, rt, any(j.set == "random" and j.labels == "soft" for j in pending))
    p.compiled_archs = compiled_archs(p, cfg, pending, rt.device)
    results = []
    log.info("evaluate: training %d students (%d epochs each) on %d set(s)", len(pending), cfg.epochs,
             len({j.set for j in pending}))
    bar = progress(total=len(pending) * cfg.epochs, desc="evaluate: student epochs", enabled=rt.is_main)
    for group in plan_cohorts(p, cfg, pending, sets, rt.device):
        job = group[0]
        if len(group) == 1:
            bar.set_postfix_str(f"{job.set} {job.labels} seed {job.seed}")
            accs = [train_one(p, cfg, job, *sets[job.set], rt, on_epoch=lambda: bar.update(1))]
        else:
            bar.set_postfix_str(f"{len(group)} students together")
            accs = train_cohort(p, cfg, group, sets, rt, on_epoch=bar.update)
        for job, acc in zip(group, accs):
            done[job.key] = acc
            log.info("evaluate: %s %s %s seed %d: top-1 %.4f", job.arch, job.set, job.labels, job.seed, acc)
            rt.log_metrics({f"evaluate/{job.arch}/{job.set}/{job.labels}": acc}, job.seed)
    for job in mine:
        results.append({"arch": job.arch, "set": job.set, "labels": job.labels, "seed": job.seed,
                        "top1": done[job.key]})
    bar.close()
    return [r for part in rt.gather_object(results) for r in part]


def summarize(p: Plan, cfg: EvaluateConfig, results: list[dict], seconds: float) -> dict:
    """Mean +- std per (arch, set, labels), DD-Ranking scores, and the evaluation's metadata."""
    summary = []
    for arch in p.archs:
        for name in ("distilled", "random"):
            for mode in ("hard", "soft"):
                accs = [r["top1"] for r in results if (r["arch"], r["set"], r["labels"]) == (arch, name, mode)]
                if accs:
                    mu, sd = mean_std(accs)
                    summary.append({"arch": arch, "set": name, "labels": mode, "mean": mu, "std": sd,
                                    "n": len(accs), "accs": accs})

    def get(name, mode):
        return next((s["mean"] for s in summary if (s["arch"], s["set"], s["labels"]) == (p.archs[0], name, mode)),
                    None)

    return {
        "ipc": p.ipc, "num_classes": p.distilled.num_classes, "protocol": cfg.protocol, "epochs": cfg.epochs,
        "full_data_top1": p.full, "summary": summary, "runs": results, "zca": p.zca is not None,
        "soft_label_bytes_per_image": p.soft.bytes_per_image() if p.soft is not None else None,
        "dd_ranking": dd_ranking(p.full, get("distilled", "hard"), get("random", "hard"), get("distilled", "soft"),
                                 get("random", "soft")),
        "seconds": seconds, "config": to_dict(cfg), "fingerprint": p.fingerprint,
    }


def write_metrics(out: Path, cfg: EvaluateConfig, metrics: dict) -> None:
    write_json(out / "metrics.json", metrics)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arch", "set", "labels", "mean", "std", "n"])
    for s in metrics["summary"]:
        w.writerow([s["arch"], s["set"], s["labels"], f"{s['mean']:.4f}", f"{s['std']:.4f}", s["n"]])
    with atomic_path(out / "metrics.csv") as tmp:
        tmp.write_text(buf.getvalue())
    write_config(out, cfg)


def run(cfg: EvaluateConfig, rt=None) -> dict:
    """Evaluate a distilled set: plan (everything checked first), baseline, students (resumable), summary."""
    rt = rt or get_runtime()
    t0 = time.perf_counter()
    p = plan(cfg, rt)
    rt.start_tracking(p.out, "evaluate", to_dict(cfg))
    if p.zca is not None:
        log.info("evaluate: students see ZCA-whitened inputs (%s), as the set was distilled", p.manifest["zca"])
    results = students(p, cfg, rt)
    metrics = summarize(p, cfg, results, time.perf_counter() - t0)
    for name in cfg.evaluators:
        metrics[name] = EVALUATORS.get(name)(p, cfg, rt)
    if rt.is_main:
        write_metrics(p.out, cfg, metrics)
        log.info("evaluate:\n%s", format_summary(metrics))
    rt.end_tracking()
    rt.wait()
    return metrics


def format_summary(metrics: dict) -> str:
    lines = [f"{'arch':<16} {'set':<10} {'labels':<6} {'top-1 (mean +- std)':>22}"]
    for s in metrics["summary"]:
        lines.append(f"{s['arch']:<16} {s['set']:<10} {s['labels']:<6} "
                     f"{100 * s['mean']:>13.2f} +- {100 * s['std']:.2f}  (n={s['n']})")
    ranking = metrics.get("dd_ranking") or {}
    if ranking:
        lines.append("DD-Ranking: " + ", ".join(f"{k} {100 * v:+.2f}" if k != "LRS" else f"{k} {v:.3f}"
                                                for k, v in ranking.items()))
    for name, d in (metrics.get("diversity") or {}).items():
        if d:  # empty at IPC 1: one image per class has no within-class spread
            lines.append(f"within-class diversity, {name}: pixel {d['pixel']:.4f}"
                         + (f", teacher feature {d['feature']:.3f}" if "feature" in d else ""))
    return "\n".join(lines)
