"""``distillset attack leak``: how much of a private batch its shared gradient gives away (DLG, iDLG).

Each *trial* plays one round of federated SGD and one attack on it:

1. the victim: a shared model (a freshly initialised sigmoid LeNet per trial, as DLG and iDLG do, or a trained
   ``distillset squeeze`` checkpoint) computes the mean cross-entropy gradient of ``batch_size`` private images
   drawn from ``--data`` (training split) or from a distilled set (``--distilled``), and writes it as a gradient file;
2. the attacker: the recover engine runs the ``dlg`` or ``idlg`` objective on that file (pixel parametrization from
   noise, L-BFGS), with the shared model as its teacher;
3. the score: every reconstruction is paired with an original by the best assignment (the Hungarian method,
   ``scipy.optimize.linear_sum_assignment``, on the pixel MSE: the attack recovers a set, not an order), then MSE,
   PSNR (capped at 100 dB), SSIM (torchmetrics) and whether the recovered label is the original's; beside them the
   PSNR of a uniform random image and of the pool's mean image (what guessing gets). For distilled-set captures the
   PSNR of each reconstruction to its nearest real training image is reported too: sharing gradients of synthetic
   images leaks the synthetic images, and this says how close those are to any real one.

``--gradient FILE`` attacks a gradient captured elsewhere instead (its model from ``--model`` or the folder the file
names); a file of another architecture than the model is refused in one line before anything is written.

Writes into ``--out``: ``config.yaml``, ``leak.json`` (per image, per trial, means), ``leak.csv`` (one row per
image), ``grid.png`` (per trial a row of originals over a row of reconstructions, in assignment order) and
``trials/NNN/`` (the victim model, ``gradient.safetensors``, ``truth.safetensors``, ``reconstruction.safetensors``,
``result.json``). A re-run skips the trials already finished.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillset.core.config import check_number, config_diff, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source, resize_uint8
from distillset.core.errors import DistillError
from distillset.core.io import (
    atomic_path,
    finished_record,
    inside,
    load_tensors,
    require_folder,
    save_tensors,
    write_csv,
    write_json,
)
from distillset.core.partition import Unit, mix_seed
from distillset.core.runtime import get_runtime

log = logging.getLogger("distillset.leak")

METHODS = ("dlg", "idlg")
NON_SEMANTIC = ("out",)


@dataclass
class LeakConfig:
    """Gradient leakage: reconstruct the private images (and labels) behind a shared gradient with DLG or iDLG.

    Attributes:
        out: run folder (config.yaml, leak.json, leak.csv, grid.png, trials/NNN/).
        method: dlg (images and soft labels optimised together) or idlg (labels read from the last layer's
            gradient, then the images).
        data: source of the victim's private images (its training split), e.g. npz:PATH or digits; with
            --distilled, the real images searched for the nearest one to each reconstruction (optional).
        distilled: a distilled-set folder: the victim's batch is drawn from its images instead of real ones.
        gradient: attack this gradient file (e.g. trials/NNN/gradient.safetensors of an earlier run) instead of
            capturing one; its batch size is the file's.
        truth: with --gradient, a truth.safetensors (images, labels) to score the reconstruction against.
        model: the shared model: "" = a freshly initialised `arch` per trial (DLG's setting), else a `distillset
            squeeze` folder (with --gradient: the model the gradient was computed on, default the one it names).
        arch: architecture of the fresh shared model (backbone registry name).
        model_kwargs: its keyword arguments (lenet_sigmoid: width, init_range).
        batch_size: private images behind one gradient (mean cross-entropy over the batch).
        trials: independent rounds (new images and a new fresh model each); results are averaged.
        iterations: optimiser steps of the attack (an L-BFGS step runs up to 20 evaluations and stops early once
            converged; DLG and iDLG use 300).
        lr: learning rate of the attack (L-BFGS step scale 1 as in DLG; about 0.1 for adam).
        optimizer: lbfgs (DLG, iDLG) or adam.
        metric: gradient distance: mse (DLG's squared L2 over every parameter tensor), cos or ours (DC's).
        clamp: clamp the dummy images to [0, 1] after every step (DLG does not: it can stall L-BFGS).
        seed: base seed; images, fresh model and dummy initialisation of trial t derive from (seed, t).
    """

    out: str = "output/leak"
    method: str = "idlg"
    data: str = ""
    distilled: str = ""
    gradient: str = ""
    truth: str = ""
    model: str = ""
    arch: str = "lenet_sigmoid"
    model_kwargs: dict = field(default_factory=dict)
    batch_size: int = 1
    trials: int = 1
    iterations: int = 300
    lr: float = 1.0
    optimizer: str = "lbfgs"
    metric: str = "mse"
    clamp: bool = False
    seed: int = 0

    def __post_init__(self):
        from distillset.recover.objectives.dc import gradient_distance
        from distillset.squeeze.models import model_entry

        if self.method not in METHODS:
            raise DistillError(f"unknown leakage method '{self.method}'; use dlg or idlg.")
        if self.gradient and (self.data or self.distilled):
            raise DistillError("--gradient attacks a captured gradient, --data/--distilled capture a new one; give "
                               "one of them.")
        if not (self.gradient or self.data or self.distilled):
            raise DistillError("say where the private batch comes from: --data SPEC (real images), --distilled "
                               "FOLDER (a distilled set) or --gradient FILE (a captured gradient).")
        if self.truth and not self.gradient:
            raise DistillError("--truth scores an attack on --gradient FILE; captured runs keep their own.")
        if self.gradient and self.trials != 1:
            raise DistillError("--gradient is one captured gradient: trials must be 1.")
        if min(self.batch_size, self.trials, self.iterations) < 1:
            raise DistillError("batch_size, trials and iterations must be >= 1.")
        if self.optimizer not in ("lbfgs", "adam"):
            raise DistillError(f"unknown optimizer '{self.optimizer}'; use lbfgs or adam.")
        check_number(self.lr, "lr")
        gradient_distance([torch.ones(1, 1)], [torch.ones(1, 1)], self.metric)  # validates the name
        if not self.model:
            model_entry(self.arch)  # an unknown architecture fails here, before any work


@dataclass
class _Plan:
    """What every trial needs, read and checked before anything is written."""

    pool: ImageSet | None = None  # the images the victim's batch is drawn from
    pool_name: str = ""
    real: ImageSet | None = None  # real training images for the nearest-real distance (distilled captures)
    shared: str = ""  # spec of the shared model when it is not fresh per trial
    captured: object = None  # the CapturedGradient of --gradient
    truth: dict | None = None
    mean_image: torch.Tensor | None = None  # the pool's mean image in [0, 1]: the constant guess


def _plan(cfg: LeakConfig, device) -> _Plan:
    from distillset.core.distilled import load_distilled
    from distillset.recover.objectives.leak import load_gradient
    from distillset.squeeze.checkpoint import load_teacher

    plan = _Plan()
    if cfg.gradient:
        plan.captured = cap = load_gradient(cfg.gradient)
        plan.shared = cfg.model or _named_model(cap)
        cap.check_model(load_teacher(plan.shared, device=device))  # another architecture: refused here
        if cfg.truth:
            plan.truth = load_tensors(cfg.truth)
            if not {"images", "labels"} <= set(plan.truth) or len(plan.truth["images"]) != cap.batch_size:
                raise DistillError(f"{cfg.truth} must hold 'images' and 'labels' of the {cap.batch_size} image(s) "
                                   f"behind {cfg.gradient} (the trial's truth.safetensors).")
        return plan
    if cfg.distilled:
        plan.pool, _ = load_distilled(cfg.distilled)
        plan.pool_name = f"distilled set {cfg.distilled}"
        if cfg.data:
            real = Source(cfg.data).load("train")
            if real.image_shape[0] != plan.pool.image_shape[0]:
                raise DistillError(f"{cfg.data} has {real.image_shape[0]}-channel images but the distilled set "
                                   f"{plan.pool.image_shape[0]}-channel ones; give the data it was distilled from.")
            if real.image_shape != plan.pool.image_shape:
                real = ImageSet(resize_uint8(real.images, plan.pool.image_shape[-1]), real.labels, real.class_names)
            plan.real = real
    else:
        plan.pool = Source(cfg.data).load("train")
        plan.pool_name = f"{cfg.data} (train)"
    plan.mean_image = sum(plan.pool.images[i:i + 4096].double().sum(0) for i in range(0, len(plan.pool), 4096))
    plan.mean_image = (plan.mean_image / (255 * len(plan.pool))).float()
    if cfg.batch_size > len(plan.pool):
        raise DistillError(f"batch_size {cfg.batch_size} exceeds the {len(plan.pool)} images of {plan.pool_name}.")
    if cfg.model:
        t = load_teacher(cfg.model, device=device)
        shape = (t.config.in_chans, t.config.img_size, t.config.img_size)
        if shape != plan.pool.image_shape or t.config.num_classes != plan.pool.num_classes:
            raise DistillError(f"model {cfg.model} takes {'x'.join(map(str, shape))} images of "
                               f"{t.config.num_classes} classes but {plan.pool_name} has "
                               f"{'x'.join(map(str, plan.pool.image_shape))} images of {plan.pool.num_classes}; "
                               "use a model trained on this data (or none: a fresh one).")
        plan.shared = cfg.model
    return plan


def _named_model(cap) -> str:
    """The shared model a gradient file names (a folder beside it), checked to lie inside the file's folder."""
    name = cap.meta.get("model")
    if not name:
        raise DistillError(f"{cap.path} does not say where its model is (computed on "
                           f"{cap.meta.get('model_source') or 'an unnamed model'}); pass it with --model.")
    return str(inside(cap.path.parent, name, f"gradient file {cap.path.name} 'model'"))


def run(cfg: LeakConfig, rt=None) -> dict:
    """Run (or finish) a leakage run; returns what leak.json holds."""
    rt = rt or get_runtime()
    out = require_folder(cfg.out)
    if not rt.is_main:  # one attack is one small optimisation: the main process runs it
        rt.wait()
        return {}
    fp = fingerprint(cfg, NON_SEMANTIC)
    done = finished_record(out / "leak.json", fp, "a leakage run",
                           lambda r: config_diff(r.get("config"), to_dict(cfg), NON_SEMANTIC))
    if done is None:
        plan = _plan(cfg, rt.device)  # every input is checked before the first byte is written
        write_config(out, cfg)
        trials = [_trial(cfg, plan, t, out, rt, fp) for t in range(cfg.trials)]
        done = _write_results(out, cfg, fp, trials)
    rt.wait()
    return done


# ---------------------------------------------------------------------------------------------------------- a trial


def _trial(cfg: LeakConfig, plan: _Plan, t: int, out: Path, rt, fp: str) -> dict:
    """One capture (or the given gradient) and one attack on it; the trial's record (kept in its result.json)."""
    folder = out / "trials" / f"{t:03d}"
    record = finished_record(folder / "result.json", fp, f"trial {t} of a leakage run")
    if record is not None:
        return record
    seed = mix_seed(cfg.seed, 7, t)
    if plan.captured is not None:
        gradient, spec, truth = plan.captured.path, plan.shared, plan.truth
        if truth is not None:  # beside the reconstruction, for the grid
            save_tensors(folder / "truth.safetensors", truth, {"images_from": str(cfg.truth)})
    else:
        gradient, spec, truth = _capture(cfg, plan, folder, seed, rt.device)
    t0 = time.perf_counter()
    images, labels, state, logs = reconstruct(str(gradient), spec, cfg, seed, rt)
    seconds = time.perf_counter() - t0
    save_tensors(folder / "reconstruction.safetensors", {"images": images, "labels": labels},
                 {"method": cfg.method})
    record = {"fingerprint": fp, "trial": t, "method": cfg.method, "batch_size": len(images),
              "grad_distance": float(state["grad_distance"][0]), "seconds": seconds, "loss_log": logs,
              "gradient": str(gradient), "model": spec}
    if truth is not None:
        g = torch.Generator().manual_seed(mix_seed(seed, 11))
        record["images"] = score(truth["images"], truth["labels"], images, labels, g, plan.mean_image, plan.real)
        record["order"] = [im["reconstruction"] for im in record["images"]]
    else:
        record["images"] = [{"index": i, "reconstruction": i, "recovered_label": int(labels[i])}
                            for i in range(len(labels))]
        record["order"] = list(range(len(labels)))
    write_json(folder / "result.json", record)
    log.info("trial %d: %s", t, {k: round(v, 4) for k, v in _means([record]).items()})
    return record


def _capture(cfg: LeakConfig, plan: _Plan, folder: Path, seed: int, device) -> tuple[Path, str, dict]:
    """The victim's side: draw the batch, (make the fresh model,) write the gradient file and the truth."""
    from distillset.recover.objectives.leak import capture_gradient, save_gradient
    from distillset.squeeze.checkpoint import load_teacher

    pool = plan.pool
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:cfg.batch_size]
    images, labels = pool.images[idx], pool.labels[idx]
    spec = plan.shared or str(_fresh_model(cfg, pool, folder / "model", seed))
    teacher = load_teacher(spec, device=device)
    grads = capture_gradient(teacher, images.to(device).float() / 255, labels.to(device))
    save_gradient(folder / "gradient.safetensors", grads, teacher=teacher, batch_size=cfg.batch_size,
                  model="" if plan.shared else "model",
                  extra={"model_source": spec, "images_from": plan.pool_name})
    truth = {"images": images, "labels": labels, "indices": idx}
    save_tensors(folder / "truth.safetensors", truth, {"images_from": plan.pool_name})
    return folder / "gradient.safetensors", spec, truth


def _fresh_model(cfg: LeakConfig, pool: ImageSet, folder: Path, seed: int) -> Path:
    """A randomly initialised shared model for one trial, saved as a squeeze folder (what the attacker is given).
    It takes raw ``[0, 1]`` pixels (mean 0, std 1), as in DLG."""
    from distillset.squeeze.checkpoint import BackboneConfig, save_backbone
    from distillset.squeeze.models import create_model

    c, h, _ = pool.image_shape
    with torch.random.fork_rng(devices=[]):  # the trial's own seed, without touching the caller's generator
        torch.manual_seed(seed)
        model = create_model(cfg.arch, pool.num_classes, c, h, **cfg.model_kwargs)
    save_backbone(folder, model, BackboneConfig(cfg.arch, pool.num_classes, c, h, [0.0] * c, [1.0] * c,
                                                list(pool.class_names), dict(cfg.model_kwargs),
                                                source="attack leak: fresh initialisation"))
    return folder


def reconstruct(gradient: str, model: str, cfg: LeakConfig, seed: int, rt) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    dict, dict]:
    """The attacker's side: the recover engine optimises one unit of the gradient's batch size with the ``dlg`` or
    ``idlg`` objective. Returns the images ``(B, C, H, W)`` in ``[0, 1]``, the recovered labels, the objective's
    final state (labels, gradient distance) and the engine's last logs."""
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import Engine
    from distillset.recover.objectives.leak import load_gradient

    b = load_gradient(gradient).batch_size
    rc = RecoverConfig(out="", teachers=[model], method=cfg.method,
                       options={"gradient": gradient, "metric": cfg.metric},
                       param_options={"init": "noise", "clamp": cfg.clamp}, augmentation="none", ipc=b,
                       iterations=cfg.iterations, lr=cfg.lr, optimizer=cfg.optimizer, betas=(0.9, 0.999),
                       schedule="constant", classes_per_unit=0, seed=seed, autocast="none", channels_last=False,
                       log_every=max(1, cfg.iterations // 10))
    engine = Engine(rc, rt)
    # one unit of b images: the batch shares one gradient; their nominal class (0) is unused, the objective
    # recovers the labels itself
    syn, logs = engine.optimise(Unit(0, 0, 1, 0, b))
    state = engine.objective.final_state()
    return syn.render().detach().float().clamp(0, 1).cpu(), state["labels"], state, logs


# ------------------------------------------------------------------------------------------------------- the score


def score(originals: torch.Tensor, labels: torch.Tensor, recon: torch.Tensor, rec_labels: torch.Tensor,
          generator: torch.Generator, mean_image: torch.Tensor | None = None,
          real: ImageSet | None = None) -> list[dict]:
    """Per original image: the reconstruction assigned to it and how close it is.

    Reconstructions are paired with originals by the assignment of least total pixel MSE (Hungarian method), since
    a batch's gradient does not say which dummy image is which original.

    Args:
        originals: ``(B, C, H, W)`` uint8.
        labels: their labels.
        recon: ``(B, C, H, W)`` in ``[0, 1]``.
        rec_labels: the recovered label of each reconstruction.
        generator: draws the uniform random guess.
        mean_image: the pool's mean image in ``[0, 1]`` (the constant guess), or ``None``.
        real: real training images to find each reconstruction's nearest one in (distilled captures), or ``None``.
    """
    from scipy.optimize import linear_sum_assignment
    from torchmetrics.functional.image import structural_similarity_index_measure

    def psnr(a, b):  # dB for a data range of 1, capped at 100 (MSE 1e-10) so an exact copy stays a finite number
        return 10 * torch.log10(1 / (a - b).square().flatten(1).mean(1).clamp_min(1e-10))

    def ssim(a, b):
        return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")

    orig = originals.float() / 255
    cost = (orig[:, None] - recon[None]).square().flatten(2).mean(-1)  # (original, reconstruction)
    rows, cols = linear_sum_assignment(cost.double().numpy())
    cols = torch.as_tensor(cols)
    matched = recon[cols]
    noise = torch.rand(orig.shape, generator=generator)
    rows_out = {"mse": cost[torch.as_tensor(rows), cols], "psnr": psnr(matched, orig), "ssim": ssim(matched, orig),
                "psnr_random": psnr(noise, orig)}
    if mean_image is not None:
        rows_out["psnr_mean"] = psnr(mean_image.expand_as(orig), orig)
    if real is not None:
        rows_out["psnr_nearest_real"] = psnr(matched, nearest(matched, real))
        rows_out["original_psnr_nearest_real"] = psnr(orig, nearest(orig, real))
    out = []
    for i in range(len(orig)):
        item = {"index": i, "reconstruction": int(cols[i]), "label": int(labels[i]),
                "recovered_label": int(rec_labels[cols[i]]), "label_correct": bool(rec_labels[cols[i]] == labels[i])}
        item.update({k: float(v[i]) for k, v in rows_out.items()})
        out.append(item)
    return out


def nearest(images: torch.Tensor, real: ImageSet, chunk: int = 4096) -> torch.Tensor:
    """The real image of least pixel MSE to each of ``images`` (``[0, 1]``), searched in chunks (bounded memory)."""
    flat = images.flatten(1)
    best = torch.full((len(images),), float("inf"))
    arg = torch.zeros(len(images), dtype=torch.long)
    for s in range(0, len(real), chunk):
        r = real.images[s:s + chunk].float().flatten(1) / 255
        d = torch.cdist(flat, r).square()
        v, j = d.min(1)
        better = v < best
        best[better], arg[better] = v[better], j[better] + s
    return real.images[arg].float() / 255


# ----------------------------------------------------------------------------------------------------------- results


SUMMARY = ("mse", "psnr", "ssim", "label_correct", "psnr_random", "psnr_mean", "psnr_nearest_real",
           "original_psnr_nearest_real")


def _means(trials: list[dict]) -> dict[str, float]:
    """Means over every image of every trial (and the median PSNR: DLG either succeeds or fails, the mean hides it)."""
    images = [im for t in trials for im in t["images"]]
    out = {}
    for k in SUMMARY:
        vals = [float(im[k]) for im in images if k in im]
        if vals:
            out[k] = statistics.fmean(vals)
    if "psnr" in out:
        out["psnr_median"] = statistics.median(float(im["psnr"]) for im in images)
    if "label_correct" in out:
        out["label_accuracy"] = out.pop("label_correct")
        # order-free: the share of the batch's labels recovered (a multiset), whatever images they end up on; the
        # per-image accuracy above also needs the right image to carry the label
        out["label_set_accuracy"] = statistics.fmean(_multiset_overlap(t["images"]) for t in trials)
    out["grad_distance"] = statistics.fmean(t["grad_distance"] for t in trials)
    out["seconds_per_trial"] = statistics.fmean(t["seconds"] for t in trials)
    return out


def _multiset_overlap(images: list[dict]) -> float:
    from collections import Counter

    truth, found = Counter(im["label"] for im in images), Counter(im["recovered_label"] for im in images)
    return sum((truth & found).values()) / len(images)


def _write_results(out: Path, cfg: LeakConfig, fp: str, trials: list[dict]) -> dict:
    rows = []
    for t in trials:
        for im in t["images"]:
            rows.append({"trial": t["trial"], **{k: v for k, v in im.items()}, "grad_distance": t["grad_distance"]})
    write_csv(out / "leak.csv", rows)
    save_pairs_grid(out / "grid.png", out, trials, cfg.method)
    means = _means(trials)
    result = {"fingerprint": fp, "config": to_dict(cfg), "method": cfg.method, "batch_size": trials[0]["batch_size"],
              "trials": len(trials), "means": means, "per_trial": trials,
              "matching": "reconstructions paired with originals by least total pixel MSE "
                          "(scipy.optimize.linear_sum_assignment)"}
    write_json(out / "leak.json", result)  # last: its presence marks the run finished
    log.info("leak %s, batch %d, %d trial(s): %s", cfg.method, result["batch_size"], len(trials),
             {k: round(v, 4) for k, v in means.items()})
    return result


def save_pairs_grid(path: Path, out: Path, trials: list[dict], method: str, max_trials: int = 8,
                    max_images: int = 16, gap: int = 2) -> None:
    """Per trial (at most ``max_trials``) a row of originals over a row of reconstructions in assignment order,
    each tile captioned with its (recovered) label."""
    from PIL import Image, ImageDraw

    pairs = []
    for t in trials[:max_trials]:
        folder = out / "trials" / f"{t['trial']:03d}"
        rec = load_tensors(folder / "reconstruction.safetensors")["images"]
        truth_file = folder / "truth.safetensors"
        orig = load_tensors(truth_file)["images"].float() / 255 if truth_file.exists() else None
        order = torch.as_tensor(t["order"])
        pairs.append((t, orig, rec[order]))
    _, c, h, w = pairs[0][2].shape
    scale = max(1, 56 // w)
    th, tw, cap = h * scale, w * scale, 11
    n = min(max_images, max(len(p[2]) for p in pairs))
    label_w = 70
    rows = sum(2 if p[1] is not None else 1 for p in pairs)
    canvas = Image.new("RGB", (label_w + n * (tw + gap) + gap, rows * (th + cap + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    top = gap
    for t, orig, rec in pairs:
        ims = t["images"]
        for name, batch, key in (("original", orig, "label"), (method, rec, "recovered_label")):
            if batch is None:
                continue
            draw.text((4, top + cap + th // 2 - 5), f"{t['trial']}: {name}", fill="black")
            for j in range(min(n, len(batch))):
                a = (batch[j].clamp(0, 1) * 255).round().to(torch.uint8)
                a = a.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
                tile = Image.fromarray(a[0] if c == 1 else a.transpose(1, 2, 0)).convert("RGB")
                x = label_w + gap + j * (tw + gap)
                canvas.paste(tile, (x, top + cap))
                lab = ims[j].get(key, ims[j].get("label")) if j < len(ims) else ""
                ok = ims[j].get("label_correct", True) if j < len(ims) else True
                draw.text((x + 1, top), str(lab), fill="black" if key == "label" or ok else "red")
            top += th + cap + gap
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
