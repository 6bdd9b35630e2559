"""``distillset privacy mia`` and ``distillset privacy nearest``: does a distilled set leak its training data?

``privacy mia`` splits a training set into members and non-members (disjoint, equal size, stratified, per seed),
builds each target's training set from the members only, trains a target model on it and attacks it
(:mod:`distillset.relabel.privacy`):

* ``members``: the member images themselves (the leak every distilled set is compared with);
* ``random``: a random-real coreset of the members at the run's IPC;
* any other name: a distilled set made from the members by the recover engine (its entry holds recover fields:
  ``method``, ``options``, ``param_options: {init: real}``, ``iterations``, ``lr`` ...).

Each target is trained with the same student recipe (``epochs`` may be set per target) and reported with its test
accuracy beside the attack (privacy without utility is no result). Everything lands under ``out``: the split of each
seed as an npz (the recover engine's data source), the distilled sets under ``sets/``, one JSON per (target, seed)
under ``targets/`` (a rerun skips them), ``mia.json``, ``mia.csv``, ``roc.png``.

``privacy nearest`` takes distilled sets and lists, for each synthetic image, its nearest training images by L2,
SSIM and teacher features beside the same numbers of held-out real images; ``nearest.json``, ``nearest.csv`` and
one PNG grid per set (synthetic | nearest k by each measure).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distillset.core.config import from_dict, to_dict, write_config
from distillset.core.data import ImageSet, Source
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, require_folder, write_csv, write_json

log = logging.getLogger("distillset.privacy")

REAL_TARGETS = ("members", "random")
TARGET_KEYS = ("epochs",)  # target fields besides the recover config's


def _default_targets() -> dict:
    dm = {"method": "dm", "iterations": 200, "optimizer": "sgd", "lr": 1.0, "momentum": 0.5, "schedule": "constant",
          "augmentation": "none", "classes_per_unit": 0, "options": {"batch_real": 64, "aug": "dsa"}}
    return {"members": {}, "random": {}, "dm": dm, "dm_real": {**dm, "param_options": {"init": "real"}}}


@dataclass
class MIAConfig:
    """Membership inference against models trained on members, distilled sets of them, and random coresets.

    Attributes:
        out: output folder (splits, sets/, targets/, mia.json, mia.csv, roc.png, config.yaml).
        data: the real data (its train split is split into members and non-members; test gives utility).
        members_per_class: members per class (as many non-members are drawn, disjoint).
        split: a JSON file {"members": [...], "non_members": [...]} of train-split indices to use instead of
            drawing one per seed (then one split for every seed).
        seeds: how many seeds (member split, distillation and target training each take seed + k).
        seed: the base seed.
        ipc: images per class of the distilled sets and of the random coreset.
        targets: name -> target: ``members`` and ``random`` are the real-image targets; any other name is a
            distilled set given by recover fields (method, options, param_options, iterations, lr, optimizer ...).
            Every entry may set ``epochs`` for its target model.
        arch: architecture of the target models.
        model_kwargs: its keyword arguments (e.g. width).
        epochs: training epochs of a target model (a target's ``epochs`` overrides it).
        protocol: target training: plain (SGD, no augmentation: the usual MIA target), matching or sre2l.
        batch_size: target batch size.
        lr: target learning rate (0 = the protocol's).
        shadows: LiRA-style attack with this many shadow targets per target and seed, each trained by the same
            pipeline on a random half of members + non-members (0 = off; costs shadows x a target's pipeline).
        image_size: resize the data (0 = keep).
    """

    out: str = "output/privacy/mia"
    data: str = "digits"
    members_per_class: int = 50
    split: str = ""
    seeds: int = 3
    seed: int = 0
    ipc: int = 10
    targets: dict = field(default_factory=_default_targets)
    arch: str = "convnet"
    model_kwargs: dict = field(default_factory=lambda: {"width": 64})
    epochs: int = 100
    protocol: str = "plain"
    batch_size: int = 64
    lr: float = 0.0
    shadows: int = 0
    image_size: int = 0

    def __post_init__(self):
        from distillset.relabel.student import PROTOCOLS

        if self.members_per_class < 1 or self.seeds < 1 or self.ipc < 1:
            raise DistillError("members_per_class, seeds and ipc must be >= 1.")
        if self.epochs < 1 or self.batch_size < 1 or self.shadows < 0 or self.image_size < 0:
            raise DistillError("epochs and batch_size must be >= 1, shadows and image_size >= 0.")
        if self.shadows == 1:
            raise DistillError("shadows = 1 gives no in/out pair per example; use 0 (off) or at least 2 (LiRA's "
                               "paper uses 16-256; 4-8 already separate members here).")
        if self.protocol not in PROTOCOLS:
            raise DistillError(f"unknown protocol '{self.protocol}'; use {', '.join(PROTOCOLS)}.")
        if self.ipc > self.members_per_class:
            raise DistillError(f"ipc {self.ipc} exceeds members_per_class {self.members_per_class}: a set of the "
                               "members cannot hold more images per class than there are members.")
        if not self.targets or not isinstance(self.targets, dict):
            raise DistillError("targets must name at least one target (members, random, or a distilled set).")
        for name, entry in self.targets.items():
            recover_fields(name, entry or {})  # each distilled target validated before any work


def recover_fields(name: str, entry: dict) -> dict:
    """The recover fields of a distilled target (checked by building a RecoverConfig); ``{}`` for the real ones."""
    from distillset.recover.config import RecoverConfig

    if not isinstance(entry, dict):
        raise DistillError(f"target '{name}' must be a mapping of recover fields, got {entry!r}.")
    rest = {k: v for k, v in entry.items() if k not in TARGET_KEYS}
    if name in REAL_TARGETS:
        if rest:
            raise DistillError(f"target '{name}' uses real images and takes only {', '.join(TARGET_KEYS)}; got "
                               f"{', '.join(rest)}.")
        return {}
    if "method" not in rest:
        raise DistillError(f"target '{name}' is neither members nor random, so it is a distilled set and needs a "
                           "method (e.g. {method: dm}).")
    owned = {"out", "data", "ipc", "seed"} & set(rest)
    if owned:
        raise DistillError(f"target '{name}' sets {', '.join(sorted(owned))}, which privacy mia sets itself (the "
                           "members' split, the run's ipc and seed).")
    from_dict(RecoverConfig, {**rest, "data": "digits", "out": "unused"}, what=f"target '{name}'")
    return rest


# --------------------------------------------------------------------------------------------------------- the run


def _write_split(path: Path, members: ImageSet, test: ImageSet) -> str:
    """The members as an npz source (train = members, test = the real test split) for the recover engine."""
    if not path.exists():
        buf = io.BytesIO()
        np.savez(buf, x_train=members.images.permute(0, 2, 3, 1).numpy(), y_train=members.labels.numpy(),
                 x_test=test.images.permute(0, 2, 3, 1).numpy(), y_test=test.labels.numpy(),
                 class_names=np.array(members.class_names))
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())
    return f"npz:{path}"


def _read_split(path: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from distillset.relabel.privacy import check_split

    try:
        rec = json.loads(Path(path).read_text())
        members, non = torch.tensor(rec["members"]).long(), torch.tensor(rec["non_members"]).long()
    except FileNotFoundError:
        raise DistillError(f"split file {path} does not exist; check --split.") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DistillError(f"split file {path} is not a JSON object with integer lists 'members' and "
                           f"'non_members' ({e}).") from None
    check_split(members, non)
    bad = torch.cat([members, non])
    bad = bad[(bad < 0) | (bad >= n)]
    if len(bad):
        raise DistillError(f"split file {path} names index {int(bad[0])}, outside the {n} training images.")
    return members, non


class _Run:
    """One ``privacy mia`` run: data, splits, target pipelines and attacks, with per-(target, seed) records."""

    def __init__(self, cfg: MIAConfig, rt):
        from distillset.squeeze.data import channel_stats

        self.cfg, self.rt = cfg, rt
        self.out = require_folder(cfg.out)
        src = Source(cfg.data, cfg.image_size or None)
        self.train, self.test = src.load("train"), src.load("test")
        self.mean, self.std = channel_stats(self.train.images)
        self.given = _read_split(cfg.split, len(self.train)) if cfg.split else None
        key = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "seeds", "targets", "shadows")}
        self.base_key = key

    def fingerprint(self, name: str, seed: int, extra: str = "") -> str:
        key = {**self.base_key, "target": self.cfg.targets[name], "name": name, "seed": seed, "extra": extra}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def split(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from distillset.relabel.privacy import split_members

        if self.given is not None:
            return self.given
        return split_members(self.train.labels, self.cfg.members_per_class, self.cfg.seed + k)

    def target_set(self, name: str, pool: ImageSet, seed: int, tag: str) -> ImageSet:
        """The training images of target ``name`` built from ``pool`` (the members, or a shadow's half)."""
        from distillset.relabel.evaluate import random_subset

        if name == "members":
            return pool
        if name == "random":
            return random_subset(pool, self.cfg.ipc, seed, pool.num_classes)
        from distillset.core.distilled import load_distilled
        from distillset.recover.config import RecoverConfig
        from distillset.recover.engine import run as recover

        data = _write_split(self.out / "splits" / f"{tag}.npz", pool, self.test)
        folder = self.out / "sets" / name / tag
        fields = recover_fields(name, self.cfg.targets[name])
        rcfg = from_dict(RecoverConfig, {**fields, "out": str(folder), "data": data, "ipc": self.cfg.ipc,
                                         "seed": seed, "image_size": pool.image_shape[-1]})
        recover(rcfg, self.rt)
        images, _ = load_distilled(folder)
        return images

    def fit(self, name: str, images: ImageSet, seed: int):
        from distillset.relabel.student import StudentSpec, fit_student

        c = self.cfg
        epochs = int((c.targets[name] or {}).get("epochs", c.epochs))
        spec = StudentSpec(c.arch, dict(c.model_kwargs), epochs, c.protocol, c.batch_size, c.lr or None,
                           flip=False, autocast="none")
        return fit_student(images, spec, self.mean, self.std, seed, self.rt.device)

    def outputs(self, model, images: ImageSet):
        from distillset.relabel.privacy import example_outputs

        return example_outputs(model, images, self.mean, self.std, self.rt.device)

    def target(self, name: str, k: int) -> dict:
        """Train and attack target ``name`` on seed ``k`` (or read the record a previous run left)."""
        from distillset.relabel.privacy import threshold_attack
        from distillset.squeeze.data import evaluate_model

        seed = self.cfg.seed + k
        path = self.out / "targets" / f"{name}_seed{seed}.json"
        fp = self.fingerprint(name, seed, f"shadows={self.cfg.shadows}")
        if path.exists():
            try:
                rec = json.loads(path.read_text())
                if rec.get("fingerprint") == fp:
                    return rec
            except json.JSONDecodeError:
                pass  # written atomically: a damaged record is redone
        t0 = time.perf_counter()
        m_idx, n_idx = self.split(k)
        members, non = self.train.subset(m_idx), self.train.subset(n_idx)
        images = self.target_set(name, members, seed, f"seed{seed}")
        model = self.fit(name, images, seed)
        top1 = evaluate_model(model, self.test, self.mean, self.std, self.rt.device)
        (l_m, c_m), (l_n, c_n) = self.outputs(model, members), self.outputs(model, non)
        rec = {"target": name, "seed": seed, "fingerprint": fp, "train_images": len(images), "test_top1": top1,
               "member_loss": float(l_m.mean()), "non_member_loss": float(l_n.mean()),
               "loss_attack": threshold_attack(-l_m, -l_n)}
        if self.cfg.shadows:
            rec["lira"] = self.lira(name, members, non, torch.cat([c_m, c_n]), seed)
        rec["seconds"] = time.perf_counter() - t0
        write_json(path, rec)
        return rec

    def lira(self, name: str, members: ImageSet, non: ImageSet, target_conf: torch.Tensor, seed: int) -> dict:
        """LiRA against target ``name``: shadows trained by the same pipeline on random halves of the pool."""
        from distillset.relabel.privacy import lira_scores, threshold_attack

        pool = ImageSet(torch.cat([members.images, non.images]), torch.cat([members.labels, non.labels]),
                        members.class_names)
        n = len(members)
        confs, ins = [], []
        for j in range(self.cfg.shadows):
            g = torch.Generator().manual_seed(seed * 1000 + j + 1)
            inside = torch.zeros(len(pool), dtype=torch.bool)
            for c in range(pool.num_classes):  # a stratified half: the shadow's "members"
                idx = torch.nonzero(pool.labels == c).flatten()
                inside[idx[torch.randperm(len(idx), generator=g)[:len(idx) // 2]]] = True
            half = pool.subset(torch.nonzero(inside).flatten())
            images = self.target_set(name, half, seed * 1000 + j + 1, f"seed{seed}_shadow{j}")
            model = self.fit(name, images, seed * 1000 + j + 1)
            confs.append(self.outputs(model, pool)[1])
            ins.append(inside)
        scores = lira_scores(target_conf, torch.stack(confs), torch.stack(ins))
        return threshold_attack(scores[:n], scores[n:])


def run_mia(cfg: MIAConfig, rt=None) -> dict:
    """Train and attack every target on every seed; write mia.json, mia.csv and roc.png."""
    from distillset.core.runtime import get_runtime
    from distillset.relabel.evaluate import mean_std
    from distillset.relabel.privacy import roc_plot

    rt = rt or get_runtime()
    t0 = time.perf_counter()
    r = _Run(cfg, rt)
    write_config(r.out, cfg)
    records = []
    for k in range(1 if cfg.split else cfg.seeds):
        for name in cfg.targets:
            rec = r.target(name, k)
            a = rec["loss_attack"]
            log.info("privacy mia: %s seed %d: test top-1 %.4f, loss-attack advantage %.4f (AUC %.3f)", name,
                     rec["seed"], rec["test_top1"], a["advantage"], a["auc"])
            records.append(rec)
    summary = []
    for name in cfg.targets:
        recs = [x for x in records if x["target"] == name]
        row = {"target": name, "n": len(recs), "train_images": recs[0]["train_images"]}
        for key, get in (("test_top1", lambda x: x["test_top1"]),
                         ("advantage", lambda x: x["loss_attack"]["advantage"]),
                         ("auc", lambda x: x["loss_attack"]["auc"]),
                         ("tpr_at_1pct_fpr", lambda x: x["loss_attack"]["tpr_at_1pct_fpr"]),
                         ("lira_advantage", lambda x: x["lira"]["advantage"] if "lira" in x else None),
                         ("lira_auc", lambda x: x["lira"]["auc"] if "lira" in x else None),
                         ("lira_tpr_at_1pct_fpr", lambda x: x["lira"]["tpr_at_1pct_fpr"] if "lira" in x else None)):
            vals = [v for v in map(get, recs) if v is not None]
            if vals:
                row[key], row[key + "_std"] = mean_std(vals)
        summary.append(row)
    result = {"summary": summary, "runs": records,
              "members_per_class": cfg.members_per_class, "ipc": cfg.ipc, "seconds": time.perf_counter() - t0,
              "config": to_dict(cfg)}
    if rt.is_main:
        write_json(r.out / "mia.json", result)
        write_csv(r.out / "mia.csv", summary, floats=".4f")
        first = {x["target"]: x["loss_attack"]["roc"] for x in records if x["seed"] == records[0]["seed"]}
        roc_plot(r.out / "roc.png", first)
        log.info("privacy mia:\n%s", format_mia(result))
    return result


def format_mia(result: dict) -> str:
    lines = [f"{'target':<12} {'images':>6} {'test top-1':>14} {'advantage':>16} {'AUC':>13} {'TPR@1%FPR':>10}"]
    for s in result["summary"]:
        lines.append(f"{s['target']:<12} {s['train_images']:>6} {s['test_top1']:>7.4f}+-{s['test_top1_std']:.4f} "
                     f"{s['advantage']:>+8.4f}+-{s['advantage_std']:.4f} {s['auc']:>6.3f}+-{s['auc_std']:.3f} "
                     f"{s['tpr_at_1pct_fpr']:>10.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- nearest images


@dataclass
class NearestConfig:
    """Nearest training images of every synthetic image (L2, SSIM, teacher features), beside held-out real ones.

    Attributes:
        distilled: distilled-set folders to compare (e.g. DM from noise and DM from real initialisation).
        mia: a ``privacy mia`` run folder: its distilled sets of the first seed are compared too (a recipe chains
            it).
        out: output folder (nearest.json, nearest.csv, nearest_<set>.png, config.yaml).
        against: the real data whose training split is searched (default: the source the first set records,
            i.e. the images it was distilled from; a privacy mia set's members).
        teacher: a teacher spec for the feature-space distance (default: the first set's recorded teacher; none
            for teacher-free methods such as DM, then the feature column is left out).
        k: neighbours per image.
        reference: held-out test images (per class) whose distance to the training set is the reference.
        rows: synthetic images shown per grid (the first of each class first).
    """

    distilled: list[str] = field(default_factory=list)
    mia: str = ""
    out: str = "output/privacy/nearest"
    against: str = ""
    teacher: str = ""
    k: int = 3
    reference: int = 10
    rows: int = 10

    def __post_init__(self):
        if not self.distilled and not self.mia:
            raise DistillError("give at least one distilled set: --distilled DIR[,DIR...] (or --mia RUN, a privacy mia "
                               "folder).")

    def folders(self) -> list[str]:
        """The sets to compare: ``distilled`` and the first seed's sets of the ``mia`` run."""
        found = list(self.distilled)
        if self.mia:
            sets = Path(self.mia) / "sets"
            seeds = sorted({p.name for p in sets.glob("*/seed*") if "shadow" not in p.name and
                            (p / "manifest.json").exists()}, key=lambda s: int(s[4:]))
            if not seeds:
                raise DistillError(f"{self.mia} holds no finished distilled sets (sets/NAME/seedK); run privacy mia "
                                   "with a distilled target first.")
            found += [str(p) for p in sorted(sets.glob(f"*/{seeds[0]}")) if (p / "manifest.json").exists()]
        return found
        if self.k < 1 or self.reference < 1 or self.rows < 1:
            raise DistillError("k, reference and rows must be >= 1.")


def _set_names(folders: list[str]) -> list[str]:
    names = []
    for f in folders:
        p = Path(f)
        # a recipe's set is <out>/recover, a privacy mia set <run>/sets/NAME/seedK: name them by their parent
        name = f"{p.parent.name}_{p.name}" if p.name == "recover" or p.name.startswith("seed") else p.name
        while name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


def _first_of_each_class(labels: torch.Tensor) -> torch.Tensor:
    """Indices ordered as the first image of every class, then the second of every class, ..."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        rank[idx] = torch.arange(len(idx))
    return torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)


def run_nearest(cfg: NearestConfig, rt=None) -> dict:
    """Nearest neighbours of each set's images and of held-out real images; nearest.json/csv and a grid per set."""
    from distillset.core.distilled import load_distilled, save_rows
    from distillset.relabel.evaluate import plan_fit, random_subset
    from distillset.relabel.privacy import nearest_summary
    from distillset.squeeze.checkpoint import load_recorded_teacher, load_teacher

    folders = cfg.folders()
    sets = [load_distilled(Path(f)) for f in folders]  # every set read (and checked) before any work
    out = require_folder(cfg.out)
    data = cfg.against or sets[0][1].get("data")
    if not data:
        raise DistillError(f"{folders[0]} does not record its data source; pass --against SPEC.")
    src = Source(data)
    size = sets[0][0].image_shape
    for f, (s, _) in zip(folders, sets):
        if s.image_shape != size or s.num_classes != sets[0][0].num_classes:
            raise DistillError(f"{f} holds {s.num_classes} classes of {s.image_shape} images but "
                               f"{folders[0]} holds {sets[0][0].num_classes} of {size}; compare sets of one "
                               "task.")
    train = plan_fit(src.load("train"), size[-1])
    if train.image_shape != size:
        raise DistillError(f"the training images of '{data}' are {train.image_shape}, the sets' {size}; pass the "
                           "data the sets were distilled from.")
    test = plan_fit(src.load("test"), size[-1])
    reference = random_subset(test, min(cfg.reference, int(test.class_counts().min())), 0, test.num_classes)
    teacher = None
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, train.num_classes)
    elif sets[0][1].get("teachers"):
        teacher = load_recorded_teacher(sets[0][1]["teachers"][0], f"{folders[0]}/manifest.json",
                                        train.num_classes)
    write_config(out, cfg)
    result: dict = {"sets": {}, "data": data, "teacher": cfg.teacher or (teacher.path if teacher else None)}
    for name, folder, (syn, manifest) in zip(_set_names(folders), folders, sets):
        t0 = time.perf_counter()
        s = nearest_summary(syn, train, reference, cfg.k, teacher)  # one pass over the training set per measure
        per = s.pop("_per_image")["synthetic"]
        s["folder"], s["method"] = folder, manifest.get("method")
        s["init"] = (manifest.get("config", {}).get("param_options") or {}).get("init", "noise")
        s["seconds"] = time.perf_counter() - t0
        result["sets"][name] = s
        order = _first_of_each_class(syn.labels)[:cfg.rows]
        rows, header = [], ["synthetic"] + [f"L2 {j + 1}" for j in range(cfg.k)]
        header += [f"SSIM {j + 1}" for j in range(cfg.k)]
        if "feature_index" in per:
            header += [f"feat {j + 1}" for j in range(cfg.k)]
        for i in order.tolist():
            row = [syn.images[i]] + [train.images[j] for j in per["l2_index"][i].tolist()]
            row += [train.images[j] for j in per["ssim_index"][i].tolist()]
            if "feature_index" in per:
                row += [train.images[j] for j in per["feature_index"][i].tolist()]
            rows.append(row)
        save_rows(out / f"nearest_{name}.png", rows, [syn.class_names[int(syn.labels[i])] for i in order.tolist()],
                  header)
        log.info("privacy nearest: %s: nearest L2 %.4f (held-out real %.4f), SSIM %.3f (held-out %.3f)", name,
                 s["synthetic"]["l2_nearest_mean"], s["reference"]["l2_nearest_mean"],
                 s["synthetic"]["ssim_nearest_mean"], s["reference"]["ssim_nearest_mean"])
    write_json(out / "nearest.json", result)
    rows = []
    for name, s in result["sets"].items():
        for what in ("synthetic", "reference"):
            rows.append({"set": name, "images": what, "method": s["method"], "init": s["init"], **s[what]})
    write_csv(out / "nearest.csv", rows, floats=".4f")
    return result

