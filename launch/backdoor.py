"""``distillset attack backdoor``: backdoor attacks against dataset distillation (Liu et al., NDSS'23).

One seed, one budget, three distilled sets of the same method: ``clean`` (the data as it is), ``naive``
(NAIVEATTACK: a white trigger patch stamped on ``round(poison_rate x n)`` training images of non-target classes,
relabelled to the target, before distillation) and ``doorping`` (DOORPING: the same images, a random initial patch
that :class:`recover.doorping.DoorpingHook` re-optimises while the method distils and re-stamps on them). The
poisoned splits are written as npz sources in the run folder, so every method (dd, dc, dm, and mtt, whose experts are
recorded on the poisoned data by ``squeeze trajectories``) distils from them through the unchanged engine.

Fresh students trained on each set report clean test accuracy (CTA) and attack success rate (ASR) under every trigger
of the run, mean +- std over seeds. Writes ``backdoor.json``, ``backdoor.csv``, ``asr.png`` (bars),
``triggers.png`` (test images with each trigger), ``config.yaml``; the sets under ``clean/``, ``naive/``,
``doorping/``. A re-run skips finished distillations and students.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distillset.core.backdoor import (
    LOCATIONS,
    check_target,
    choose_poisoned,
    initial_pattern,
    patch_mask,
    poison,
    stamp,
)
from distillset.core.config import check_number, from_dict, to_dict, write_config
from distillset.core.data import ImageSet, Source
from distillset.core.distilled import save_grid
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, load_tensors, read_json, require_folder, save_tensors, write_csv, write_json
from distillset.core.runtime import get_runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.doorping import DoorpingConfig, DoorpingHook

log = logging.getLogger("distillset.backdoor")

METHODS = ("dd", "dc", "dm", "mtt")
ATTACKS = ("naive", "doorping")
# each method's recover settings (the recipes' and papers'); cfg.recover overrides them
METHOD_DEFAULTS = {
    "dc": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5, "schedule": "constant", "augmentation": "none",
           "param_options": {"init": "real"}, "classes_per_unit": 0},
    "dm": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.5, "schedule": "constant", "augmentation": "none",
           "param_options": {"init": "real"}, "classes_per_unit": 0},
    "dd": {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "augmentation": "none",
           "param_options": {"init": "real"}, "classes_per_unit": 0},
    "mtt": {"optimizer": "sgd", "lr": 100.0, "momentum": 0.5, "schedule": "constant", "augmentation": "dsa",
            "param_options": {"init": "real"}, "classes_per_unit": 0, "channels_last": False, "autocast": "none"},
}
FIXED = ("out", "data", "method", "options", "ipc", "iterations", "seed", "image_size", "max_classes")


@dataclass
class BackdoorConfig:
    """Backdoor attacks (NAIVEATTACK, DOORPING) against a distillation method, beside the clean distilled set.

    Attributes:
        out: run folder (backdoor.json, backdoor.csv, asr.png, triggers.png, config.yaml; clean/, naive/, doorping/).
        data: data source spec (train split distilled and poisoned; test split for CTA and ASR).
        method: distillation method: dd, dc, dm or mtt.
        options: the method's options (e.g. batch_real; `distillset methods NAME` lists them).
        ipc: images per class.
        iterations: engine steps of every distillation.
        recover: further recover settings over the method's defaults (lr, optimizer, momentum, param_options, ...).
        trajectories: mtt only: `squeeze trajectories` settings of the experts (num_experts, epochs, model_kwargs).
        attacks: the attacks to run beside the clean set: naive and/or doorping.
        target: the target class.
        trigger_size: side of the square trigger patch, pixels.
        trigger_location: corner of the patch: bottom_right, bottom_left, top_right, top_left (1 px margin).
        poison_rate: poisoned images as a share of all training images (drawn from the non-target classes).
        doorping: DOORPING's trigger update (update_every, steps, lr, alpha, topk, neurons, net_epochs, ...).
        students: students (seeds) per distilled set.
        student_epochs: epochs of every student.
        student_arch: student architecture.
        student_kwargs: its keyword arguments (e.g. width).
        batch_size: student batch size.
        student_lr: student learning rate (0 = the matching protocol's 0.01, or MTT's learned lr).
        test_limit: measure on N test images, the first N / classes of every class (0 = all): test splits are often
            sorted by class, so the first N images would be a few classes only.
        seed: seed of the poisoning, the initial trigger, the distillations and the students.
    """

    out: str = "output/backdoor"
    data: str = "digits"
    method: str = "dc"
    options: dict = field(default_factory=dict)
    ipc: int = 10
    iterations: int = 200
    recover: dict = field(default_factory=dict)
    trajectories: dict = field(default_factory=dict)
    attacks: list[str] = field(default_factory=lambda: ["naive", "doorping"])
    target: int = 0
    trigger_size: int = 4
    trigger_location: str = "bottom_right"
    poison_rate: float = 0.01
    doorping: dict = field(default_factory=dict)
    students: int = 3
    student_epochs: int = 300
    student_arch: str = "convnet"
    student_kwargs: dict = field(default_factory=dict)
    batch_size: int = 256
    student_lr: float = 0.0
    test_limit: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise DistillError(f"unknown method '{self.method}' for a backdoor attack; use one of "
                               f"{', '.join(METHODS)}.")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise DistillError(f"attacks must be distinct names from {', '.join(ATTACKS)}, got {self.attacks}.")
        if "doorping" in self.attacks and self.method == "mtt":
            raise DistillError("DOORPING re-stamps the real images a method reads while it distils, and mtt reads "
                               "none (it matches experts trained before); use attacks [naive] for mtt.")
        if self.target < 0:
            raise DistillError(f"target class must be >= 0, got {self.target}.")
        if self.trigger_size < 1:
            raise DistillError(f"trigger_size must be >= 1 pixel, got {self.trigger_size}.")
        if self.trigger_location not in LOCATIONS:
            raise DistillError(f"unknown trigger_location '{self.trigger_location}'; use one of "
                               f"{', '.join(LOCATIONS)}.")
        if not 0 < self.poison_rate < 1:
            raise DistillError(f"poison_rate is a share of the training images in (0, 1), got {self.poison_rate}.")
        if min(self.students, self.student_epochs, self.batch_size) < 1 or self.test_limit < 0:
            raise DistillError("students, student_epochs and batch_size must be >= 1 and test_limit >= 0.")
        check_number(self.student_lr, "student_lr (0 = the protocol's)", high=1e4, allow_low=True)
        fixed = sorted(set(self.recover) & set(FIXED))
        if fixed:
            raise DistillError(f"recover settings {fixed} are set by the attack itself (or would move the poisoned "
                               "pixels); use the attack's own fields (ipc, iterations, options, seed).")
        self.doorping_config()
        # mtt's buffer is the experts this run records; any name passes the option check
        self.recover_config("check", self.data, {"buffer": "experts"} if self.method == "mtt" else {})
        if self.method == "mtt":
            from distillset.squeeze.trajectories import TrajectoryConfig

            from_dict(TrajectoryConfig, {**self.trajectories, "data": self.data}, what="trajectories")

    def doorping_config(self) -> DoorpingConfig:
        return from_dict(DoorpingConfig, self.doorping, what="doorping")

    def recover_config(self, out: str, data: str, extra_options: dict) -> RecoverConfig:
        settings = {**METHOD_DEFAULTS[self.method], **self.recover}
        return from_dict(RecoverConfig, {**settings, "out": out, "data": data, "method": self.method,
                                         "options": {**self.options, **extra_options}, "ipc": self.ipc,
                                         "iterations": self.iterations, "seed": self.seed}, what="recover")


@dataclass
class Variant:
    """One distilled set of the run: its name, data spec, and (attacks) the trigger it was distilled with."""

    name: str
    folder: Path
    data: str
    pattern: torch.Tensor | None = None


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``n // num_classes`` images of every class (all of a smaller class), in split order."""
    per = max(1, n // num_classes)
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(num_classes)])
    return keep.sort().values


def _write_npz(path: Path, train: ImageSet, test: ImageSet) -> None:
    """A poisoned copy of the data as an npz source (uint8 NHWC), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x_train=train.images.permute(0, 2, 3, 1).numpy(), y_train=train.labels.numpy(),
                 x_test=test.images.permute(0, 2, 3, 1).numpy(), y_test=test.labels.numpy(),
                 class_names=np.array(train.class_names))


def _poisoned_source(out: Path, name: str, train: ImageSet, test: ImageSet, index: torch.Tensor,
                     pattern: torch.Tensor, mask: torch.Tensor, target: int) -> str:
    path = out / "data" / f"{name}.npz"
    key = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (index, pattern, mask.to(torch.uint8)))).hexdigest()
    stamp_file = path.with_suffix(".json")
    if not (path.exists() and stamp_file.exists() and read_json(stamp_file).get("key") == key):
        _write_npz(path, poison(train, index, pattern, mask, target), test)
        write_json(stamp_file, {"key": key, "poisoned": len(index), "target": target})
    return f"npz:{path}"


def _distil(cfg: BackdoorConfig, v: Variant, rt, mask: torch.Tensor, index: torch.Tensor) -> None:
    """Distil one variant (MTT: record its experts first); DOORPING with its hook, keeping the final trigger."""
    from distillset.recover.engine import run as recover_run

    extra = {}
    if cfg.method == "mtt":
        from distillset.squeeze.trajectories import TrajectoryConfig
        from distillset.squeeze.trajectories import run as record

        tcfg = from_dict(TrajectoryConfig, {**cfg.trajectories, "out": str(v.folder / "experts"), "data": v.data,
                                            "seed": cfg.seed}, what="trajectories")
        record(tcfg, rt)
        extra = {"buffer": tcfg.out}
    rcfg = cfg.recover_config(str(v.folder / "distilled"), v.data, extra)
    trigger_file = v.folder / "trigger.safetensors"
    hooks = ()
    if v.name == "doorping":
        def keep(pattern, history):
            write_json(v.folder / "trigger_updates.json", history)
            save_tensors(trigger_file, {"pattern": pattern})

        hooks = (DoorpingHook(cfg.doorping_config(), v.pattern, mask, index, cfg.target, on_final=keep),)
    manifest = recover_run(rcfg, rt, hooks)
    if v.name == "doorping":
        if not trigger_file.exists():
            raise DistillError(f"{v.folder}/distilled is complete but its trigger ({trigger_file}) is missing; "
                               f"delete {v.folder} and re-run.")
        v.pattern = load_tensors(trigger_file)["pattern"]
    log.info("backdoor: %s set distilled (%d images)", v.name, manifest.get("num_images", 0))


def _students(cfg: BackdoorConfig, v: Variant, test: ImageSet, triggers: dict, rt) -> list[dict]:
    """Train (or read back) the students of one variant: CTA and ASR under every trigger."""
    from distillset.core.distilled import load_distilled
    from distillset.relabel.backdoor import backdoor_scores
    from distillset.relabel.evaluate import learned_params
    from distillset.relabel.student import StudentSpec, fit_student

    folder = v.folder / "distilled"
    images, manifest = load_distilled(folder)
    c = images.image_shape[0]
    mean, std = manifest.get("mean") or [0.5] * c, manifest.get("std") or [0.5] * c
    learned = learned_params(folder)
    lr = cfg.student_lr or (float(learned["lr"].reshape(-1)[0]) if "lr" in learned else None)
    spec = StudentSpec(cfg.student_arch, dict(cfg.student_kwargs), cfg.student_epochs, "matching", cfg.batch_size,
                       lr)
    test_key = hashlib.sha256(test.images.numpy().tobytes() + test.labels.numpy().tobytes()).hexdigest()
    key = {"set": manifest.get("fingerprint"), "spec": to_dict(spec), "test": test_key,
           "target": cfg.target, "triggers": {k: hashlib.sha256(p.numpy().tobytes() + m.numpy().tobytes()).hexdigest()
                                               for k, (p, m) in triggers.items()}}
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    rows = []
    for k in range(cfg.students):
        seed = cfg.seed + 1000 * k
        path = v.folder / "students" / f"seed{seed}.json"
        if path.exists() and read_json(path).get("fingerprint") == fp:
            rows.append(read_json(path))
            continue
        model = fit_student(images, spec, mean, std, seed, rt.device)
        rec = {"fingerprint": fp, "variant": v.name, "seed": seed,
               **backdoor_scores(model, test, triggers, cfg.target, mean, std, rt.device)}
        write_json(path, rec)
        log.info("backdoor: %s student seed %d: CTA %.4f, ASR %s", v.name, seed, rec["cta"],
                 {t: round(a, 4) for t, a in rec["asr"].items()})
        rows.append(rec)
    return rows


def trigger_distance(images: ImageSet, pattern: torch.Tensor, mask: torch.Tensor, target: int) -> dict:
    """How much of a trigger a distilled set carries: mean absolute difference (in [0, 1]) between its images' pixels
    under the mask and the trigger, for the target class's images and for the others (0 = stamped exactly)."""
    d = (images.images[:, :, mask].float() - pattern[:, mask].float()).abs().mean((1, 2)) / 255
    tgt = images.labels == target
    return {"target": float(d[tgt].mean()) if tgt.any() else None,
            "others": float(d[~tgt].mean()) if (~tgt).any() else None}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(cfg: BackdoorConfig, variants: list[Variant], records: dict[str, list[dict]],
              triggers: dict) -> list[dict]:
    """One row per distilled set: CTA and the ASR under its own trigger (the clean set: under every attack's), and how
    close its images' trigger region is to each trigger."""
    from distillset.core.distilled import load_distilled

    rows = []
    for v in variants:
        recs = records[v.name]
        cta = _mean_std([r["cta"] for r in recs])
        asr = {t: _mean_std([r["asr"][t] for r in recs]) for t in recs[0]["asr"]}
        row = {"method": cfg.method, "set": v.name, "cta_mean": cta[0], "cta_std": cta[1],
               "asr": {t: {"mean": m, "std": s} for t, (m, s) in asr.items()}, "n": len(recs)}
        own = asr.get(v.name)
        row["asr_mean"], row["asr_std"] = own if own is not None else (None, None)
        images = load_distilled(v.folder / "distilled")[0]
        row["trigger_distance"] = {t: trigger_distance(images, p, m, cfg.target) for t, (p, m) in triggers.items()}
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict], triggers: list[str]) -> None:
    """One row per distilled set: CTA and each trigger's ASR (mean, std over seeds), flattened for write_csv."""
    flat = [{"method": r["method"], "set": r["set"], "cta_mean": r["cta_mean"], "cta_std": r["cta_std"],
             **{f"asr_{t}_{s}": r["asr"][t][s] for t in triggers for s in ("mean", "std")}, "n": r["n"]}
            for r in rows]
    fields = ["method", "set", "cta_mean", "cta_std"] + [f"asr_{t}_{s}" for t in triggers for s in ("mean", "std")]
    write_csv(path, flat, fields + ["n"], floats=".4f")


def plot_asr(path: Path, rows: list[dict], title: str) -> None:
    """Bars of CTA and ASR (own trigger; the clean set under each attack's trigger) per distilled set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for r in rows:
        bars.append((f"{r['set']}\nCTA", r["cta_mean"], r["cta_std"], "tab:gray"))
        for t, a in r["asr"].items():
            if r["set"] in (t, "clean"):
                label = f"{r['set']}\nASR" + (f" ({t})" if r["set"] == "clean" else "")
                bars.append((label, a["mean"], a["std"], "tab:red" if r["set"] == t else "tab:orange"))
    fig, ax = plt.subplots(figsize=(1.1 * len(bars) + 1, 3.2))
    ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], color=[b[3] for b in bars], capsize=3)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of test images")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def trigger_grid(path: Path, test: ImageSet, triggers: dict, target: int, n: int = 10) -> None:
    """A grid: a row of clean non-target test images (the first of each class in turn), then the same images with
    each trigger."""
    pools = [torch.nonzero(test.labels == c).flatten() for c in range(test.num_classes) if c != target]
    keep = torch.tensor([int(p[k]) for k in range(n) for p in pools if k < len(p)][:n], dtype=torch.long)
    rows = [test.images[keep]] + [stamp(test.images[keep], p, m) for p, m in triggers.values()]
    labels = torch.cat([torch.full((len(keep),), r, dtype=torch.long) for r in range(len(rows))])
    save_grid(path, ImageSet(torch.cat(rows), labels, ["clean"] + list(triggers)), per_class=n)


def run(cfg: BackdoorConfig, rt=None) -> dict:
    """Distil clean / naive / doorping sets with one seed and budget, train students, report CTA and ASR."""
    rt = rt or get_runtime()
    t0 = time.perf_counter()
    source = Source(cfg.data)
    train, test = source.load("train"), source.load("test")
    check_target(cfg.target, train.num_classes)  # bad input fails here, before the run folder is made
    mask = patch_mask(train.image_shape, cfg.trigger_size, cfg.trigger_location)
    index = choose_poisoned(train.labels, cfg.target, cfg.poison_rate, cfg.seed)
    out = require_folder(cfg.out)
    write_config(out, cfg)
    if cfg.test_limit:
        test = test.subset(balanced_subset(test.labels, cfg.test_limit, test.num_classes))
    variants = [Variant("clean", out / "clean", cfg.data)]
    starts = {"naive": "white", "doorping": "random"}
    for name in cfg.attacks:
        pattern = initial_pattern(train.image_shape, mask, starts[name], cfg.seed)
        data = _poisoned_source(out, name, train, test, index, pattern, mask, cfg.target)
        variants.append(Variant(name, out / name, data, pattern))
    log.info("backdoor: %d of %d training images poisoned (target %d, %dx%d trigger at %s)", len(index), len(train),
             cfg.target, cfg.trigger_size, cfg.trigger_size, cfg.trigger_location)
    for v in variants:
        _distil(cfg, v, rt, mask, index)
    triggers = {v.name: (v.pattern, mask) for v in variants if v.pattern is not None}
    records = {v.name: _students(cfg, v, test, triggers, rt) for v in variants}
    rows = summarize(cfg, variants, records, triggers)
    result = {"method": cfg.method, "data": cfg.data, "ipc": cfg.ipc, "iterations": cfg.iterations,
              "target": cfg.target, "poisoned": len(index), "train_images": len(train), "test_images": len(test),
              "trigger": {"size": cfg.trigger_size, "location": cfg.trigger_location},
              "rows": rows, "students": records, "seconds": time.perf_counter() - t0, "config": to_dict(cfg)}
    if "doorping" in cfg.attacks:  # what every trigger update achieved on its network
        result["doorping_updates"] = read_json(out / "doorping" / "trigger_updates.json")
    if rt.is_main:
        write_json(out / "backdoor.json", result)
        _write_csv(out / "backdoor.csv", rows, list(triggers))
        plot_asr(out / "asr.png", rows, f"{cfg.method.upper()} on {Path(cfg.data.partition(':')[2]).stem or cfg.data}"
                 f", IPC {cfg.ipc}, target {cfg.target}")
        trigger_grid(out / "triggers.png", test, triggers, cfg.target)
        log.info("backdoor:\n%s", format_rows(rows))
    return result


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':<6} {'set':<9} {'CTA':>14} {'ASR (own trigger)':>20}"]
    for r in rows:
        asr = (f"{100 * r['asr_mean']:.2f} +- {100 * r['asr_std']:.2f}" if r["asr_mean"] is not None else
               ", ".join(f"{t} {100 * a['mean']:.2f}" for t, a in r["asr"].items()))
        lines.append(f"{r['method']:<6} {r['set']:<9} {100 * r['cta_mean']:>6.2f} +- {100 * r['cta_std']:<5.2f} "
                     f"{asr:>20}")
    return "\n".join(lines)
