"""``distillset explain``: distilled images as the baseline ("missingness") of integrated gradients, measured.

A fine-grained classifier is explained with captum's :class:`~captum.attr.IntegratedGradients` against five
baselines: black, the training mean (per channel), the Gaussian-blurred input, uniform noise, and the distilled image
of the input's coarse class (a set distilled by coarse labels, e.g. through a ``grouped:`` data source; IPC 1, or
the nearest of IPC k in the classifier's feature space). Every baseline is scored on the same images and model by

- IG's convergence delta (completeness: ``sum(attributions) - (f(x) - f(baseline))``), absolute and relative;
- deletion and insertion AUC: pixels ranked by attribution (summed over channels) are removed from the input
  (deletion, lower is better) or inserted into it (insertion, higher is better) in ``curve_steps`` steps, each time
  replaced by one fill that is the same for every baseline, and the target's softmax probability is integrated;
- captum's ``infidelity`` (Gaussian perturbations, attributions rescaled by the optimal factor so that baselines with
  different ``f(x) - f(b)`` compare) and ``sensitivity_max`` (the attributions' change under small input noise);
- the fraction of attribution mass on the object: the data have no masks, so a central box stands in for the
  object (CIFAR-10 and Tiny-ImageNet photographs are centred on it); a uniform map scores the box's area.

Results are mean +- std over test images and seeds, per baseline, and the distilled baseline paired against each
other one on the same images (difference, and the fraction of images where it is better): ``explain.json``, one row
per (teacher, seed, image, baseline) in ``explain.csv``, the tables in ``summary.md`` and one PNG per example under
``examples/``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distillset.core.config import check_number, config_diff, fingerprint, to_dict, write_config
from distillset.core.data import ImageSet, Source, group_index, parse_grouped
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError, unknown_name
from distillset.core.io import atomic_path, finished_record, require_folder, write_csv, write_json, write_text
from distillset.core.runtime import get_runtime

log = logging.getLogger("distillset.explain")

BASELINES = ("black", "mean", "blur", "uniform", "distilled")
FILLS = ("mean", "blur", "black")
# the integration rules IntegratedGradients.attribute documents for its ``method`` argument
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
METRICS = ("abs_delta", "rel_delta", "infidelity", "sensitivity", "object_mass")  # + deletion/insertion per fill


@dataclass
class ExplainConfig:
    """Explain a fine-grained classifier with integrated gradients against standard and distilled baselines.

    Attributes:
        out: output folder (config.yaml, explain.json, explain.csv, summary.md, examples/*.png).
        teachers: the fine classifier(s) to explain (a squeeze folder or another teacher spec); each one is
            explained on the same images, and its rows join the mean +- std.
        distilled: a distilled set whose classes are the coarse groups (e.g. recover on a grouped: source; any
            method: DM, RDED, SRe2L...), at the classifier's image size.
        data: the fine-labelled real data: its test split is explained, its train split gives the mean baseline.
        groups: coarse group -> fine class names (or indices); every fine class in exactly one group, groups in the
            distilled set's class order. Default: the grouping of the distilled set's own grouped: data source.
        baselines: baselines to compare (black, mean, blur, uniform, distilled).
        pick: which distilled image of the coarse class is the baseline at IPC > 1: nearest (in the classifier's
            penultimate features) or first.
        images_per_class: test images per fine class and seed (drawn per seed, stratified).
        seeds: seeds; each draws its own test images, uniform noise and metric perturbations.
        seed: the first seed.
        target: the class explained: predicted (the classifier's fine prediction) or label (the true fine class).
            The distilled baseline is the image of that class's coarse group.
        output: what IG attributes: logit or prob (softmax probability) of the target.
        n_steps: IG integration steps.
        ig_method: captum's integration rule (gausslegendre, riemann_trapezoid, riemann_middle, ...).
        batch_size: images per IG and metric batch; captum's internal batch (scaled inputs through the model at once)
            is max(4 x batch_size, n_steps).
        blur_sigma: Gaussian blur sigma in pixels of the blur baseline and fill (0 = image side / 8).
        curve_steps: steps of the deletion and insertion curves.
        fills: what removed pixels become in deletion (and where insertion starts): mean (training mean), blur
            (the blurred input) or black; one curve per fill, the same for every baseline (a fill favours the
            baseline it equals, so two are measured by default).
        infidelity_samples: Gaussian perturbations per image for captum's infidelity.
        infidelity_std: their standard deviation (image values in [0, 1]).
        sensitivity_samples: perturbations per image for captum's sensitivity_max (each reruns IG).
        sensitivity_radius: their L-inf radius (uniform noise, image values in [0, 1]).
        object_box: side of the central square that stands in for the object, as a fraction of the image side
            (0.5: the central quarter of the pixels; no dataset here has object masks).
        examples: example PNGs written (input | each baseline and its heat map), first seed of the first teacher.
    """

    out: str = "output/explain"
    teachers: list[str] = field(default_factory=list)
    distilled: str = ""
    data: str = ""
    groups: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    pick: str = "nearest"
    images_per_class: int = 2
    seeds: int = 3
    seed: int = 0
    target: str = "predicted"
    output: str = "logit"
    n_steps: int = 32
    ig_method: str = "gausslegendre"
    batch_size: int = 16
    blur_sigma: float = 0.0
    curve_steps: int = 16
    fills: list[str] = field(default_factory=lambda: ["mean", "blur"])
    infidelity_samples: int = 8
    infidelity_std: float = 0.1
    sensitivity_samples: int = 4
    sensitivity_radius: float = 0.02
    object_box: float = 0.5
    examples: int = 4

    def __post_init__(self):
        for b in self.baselines:
            if b not in BASELINES:
                raise unknown_name("baseline", b, BASELINES)
        if not self.baselines:
            raise DistillError(f"baselines is empty; name at least one of {', '.join(BASELINES)}.")
        for f in self.fills:
            if f not in FILLS:
                raise unknown_name("deletion fill", f, FILLS)
        if self.pick not in ("nearest", "first"):
            raise DistillError(f"unknown pick '{self.pick}'; use nearest or first.")
        if self.target not in ("predicted", "label"):
            raise DistillError(f"unknown target '{self.target}'; use predicted or label.")
        if self.output not in ("logit", "prob"):
            raise DistillError(f"unknown output '{self.output}'; use logit or prob.")
        if min(self.images_per_class, self.seeds, self.n_steps, self.batch_size, self.curve_steps) < 1:
            raise DistillError("images_per_class, seeds, n_steps, batch_size and curve_steps must be >= 1.")
        if min(self.infidelity_samples, self.sensitivity_samples, self.examples) < 0:
            raise DistillError("infidelity_samples, sensitivity_samples and examples must be >= 0 (0 = off).")
        check_number(self.blur_sigma, "blur_sigma (0 = side / 8)", high=1e3, allow_low=True)
        check_number(self.infidelity_std, "infidelity_std", high=1.0)
        check_number(self.sensitivity_radius, "sensitivity_radius", high=1.0)
        check_number(self.object_box, "object_box", high=1.0)
        if not isinstance(self.groups, dict):
            raise DistillError("groups must be a mapping GROUP: [fine class, ...].")
        if "distilled" in self.baselines and not self.distilled:
            raise DistillError("the distilled baseline needs --distilled (a set distilled by coarse labels); pass it "
                               "or drop 'distilled' from --baselines.")
        if self.ig_method not in IG_METHODS:
            raise unknown_name("IG method", self.ig_method, IG_METHODS)


NON_SEMANTIC = ("out", "examples")

# ------------------------------------------------------------------------------------------------------ mathematics


class Target(nn.Module):
    """The function IG attributes: the classifier's logits or softmax probabilities (captum picks the target)."""

    def __init__(self, model: nn.Module, output: str = "logit"):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.softmax(1) if self.output == "prob" else out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` blurred with a Gaussian of ``sigma`` pixels (reflect padding; the kernel fits inside the image)."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    side = min(x.shape[-2:])
    k = min(2 * math.ceil(3 * sigma) + 1, side - 1 if side % 2 == 0 else side)
    k = max(k - (k % 2 == 0), 1)
    return tv_blur(x, [k, k], [sigma, sigma])


def check_gradients(f: nn.Module, x: torch.Tensor, what: str) -> None:
    """Refuse a model IG cannot explain: its output is not differentiable in the input, or the gradient vanishes."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = f(x)
        if not out.requires_grad:
            raise DistillError(f"{what} gives no gradient with respect to its input (its forward detaches or runs "
                               "under no_grad); integrated gradients needs a differentiable model.")
        (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    if g is None or not bool(torch.isfinite(g).all()) or float(g.abs().max()) == 0.0:
        raise DistillError(f"{what} has a zero (or non-finite) gradient with respect to its input on every test image "
                           "checked; integrated gradients would attribute nothing: explain a trained, differentiable "
                           "model.")


def integrated_gradients(f: nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: torch.Tensor,
                         n_steps: int, method: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attributions, convergence delta)`` of captum's IntegratedGradients (delta = sum(attr) - (f(x) - f(b)))."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(f)
    attr, delta = ig.attribute(x, baselines=baseline, target=target, n_steps=n_steps, method=method,
                               internal_batch_size=max(batch_size * 4, n_steps), return_convergence_delta=True)
    return attr.detach(), delta.detach()


def pixel_scores(attr: torch.Tensor) -> torch.Tensor:
    """One signed score per pixel (channels summed): the ranking of deletion and insertion, most positive first."""
    return attr.sum(1).flatten(1)


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, fill: torch.Tensor, scores: torch.Tensor,
                       target: torch.Tensor, steps: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves and their AUCs (trapezoid over the removed fraction in [0, 1]).

    Pixels are ranked by ``scores`` (``(N, H*W)``, highest first). Deletion replaces the top ``j/steps`` of them by
    ``fill``; insertion starts from ``fill`` and puts them back. The curves are the target's softmax probability at
    ``j = 0..steps``: ``(del_curve (N, steps+1), ins_curve, del_auc (N,), ins_auc)``.
    """
    n, _, h, w = x.shape
    rank = torch.empty_like(scores, dtype=torch.long)
    order = scores.argsort(1, descending=True)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())
    counts = [round(j * h * w / steps) for j in range(steps + 1)]
    curves = []
    for mode in ("deletion", "insertion"):
        probs = torch.empty(n, steps + 1)
        for j, m in enumerate(counts):
            top = (rank < m).view(n, 1, h, w)
            img = torch.where(top, fill, x) if mode == "deletion" else torch.where(top, x, fill)
            for i in range(0, n, batch_size):
                p = model(img[i:i + batch_size]).softmax(1)
                probs[i:i + batch_size, j] = p.gather(1, target[i:i + batch_size, None]).squeeze(1).cpu()
        curves.append(probs)
    aucs = [torch.trapezoid(p, dx=1.0 / steps, dim=1) for p in curves]
    return curves[0], curves[1], aucs[0], aucs[1]


def box_mask(h: int, w: int, side: float) -> torch.Tensor:
    """The central square (``side`` x the image side) that stands in for the object, as a bool ``(H, W)`` mask."""
    bh, bw = max(1, round(h * side)), max(1, round(w * side))
    m = torch.zeros(h, w, dtype=torch.bool)
    t, left = (h - bh) // 2, (w - bw) // 2
    m[t:t + bh, left:left + bw] = True
    return m


def object_mass(attr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the absolute attribution inside ``mask`` per image (``nan`` for an all-zero map)."""
    a = attr.abs().sum(1)
    total = a.flatten(1).sum(1)
    return torch.where(total > 0, (a * mask).flatten(1).sum(1) / total.clamp_min(1e-30), torch.nan)


def infidelity_score(f: nn.Module, x: torch.Tensor, attr: torch.Tensor, target: torch.Tensor, samples: int,
                     std: float, generator: torch.Generator) -> torch.Tensor:
    """captum's infidelity with Gaussian perturbations ``I``: E[(I . attr - (f(x) - f(x - I)))^2], attributions
    rescaled by the optimal factor (``normalize=True``) so that maps of different total size compare."""
    from captum.metrics import infidelity

    def perturb(inputs):
        noise = torch.randn(inputs.shape, generator=generator).to(inputs) * std
        return noise, inputs - noise

    return infidelity(f, perturb, x, attr, target=target, n_perturb_samples=samples, normalize=True).detach()


def sensitivity_score(f: nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: torch.Tensor, samples: int,
                      radius: float, n_steps: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """captum's sensitivity_max of IG: the largest change (Frobenius norm) of the attributions under uniform input
    noise of L-inf radius ``radius``, the baseline held fixed."""
    from captum.attr import IntegratedGradients
    from captum.metrics import sensitivity_max

    ig = IntegratedGradients(f)

    def perturb(inputs, perturb_radius=radius):
        noise = (torch.rand(inputs.shape, generator=generator) * 2 - 1).to(inputs) * perturb_radius
        return inputs + noise

    return sensitivity_max(ig.attribute, x, perturb_func=perturb, perturb_radius=radius, n_perturb_samples=samples,
                           baselines=baseline, target=target, n_steps=n_steps, method=method).detach()


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's last linear layer (its feature space), or the logits where it has none."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        with torch.no_grad():
            return model(x).flatten(1)
    grabbed: list[torch.Tensor] = []
    hook = linear[-1].register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return grabbed[-1]


def distilled_baseline(model: nn.Module, x: torch.Tensor, coarse: torch.Tensor, distilled: ImageSet,
                       pick: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled image of each input's coarse class: ``(baselines (N, C, H, W) in [0, 1], distilled index)``.
    At IPC > 1 ``nearest`` takes the one closest to the input in the model's penultimate features."""
    images = distilled.images.float().div(255).to(x)
    index = torch.empty(len(x), dtype=torch.long)
    feats = penultimate(model, images) if pick == "nearest" else None
    fx = penultimate(model, x) if pick == "nearest" else None
    for i, g in enumerate(coarse.tolist()):
        pool = torch.nonzero(distilled.labels == g).flatten()
        if feats is None or len(pool) == 1:
            index[i] = pool[0]
        else:
            index[i] = pool[(feats[pool] - fx[i]).square().sum(1).argmin()]
    return images[index], index


def make_baselines(names: list[str], x: torch.Tensor, mean: list[float], sigma: float,
                   generator: torch.Generator | None, distilled: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every baseline for the images ``x`` (``[0, 1]``): black, channel mean, blurred input, uniform noise,
    the distilled images (given, one per input)."""
    out = {}
    for name in names:
        if name == "black":
            out[name] = torch.zeros_like(x)
        elif name == "mean":
            out[name] = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).expand_as(x).clone()
        elif name == "blur":
            out[name] = gaussian_blur(x, sigma)
        elif name == "uniform":
            out[name] = torch.rand(x.shape, generator=generator).to(x)
        else:
            out[name] = distilled
    return out


def mean_std(values: list[float]) -> dict:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


# ----------------------------------------------------------------------------------------------------------- command


@dataclass
class Task:
    """The checked inputs of an explanation run: test images, coarse groups, distilled set and teachers."""

    teachers: list
    test: ImageSet
    mean: list[float]
    fine_to_coarse: torch.Tensor
    group_names: list[str]
    distilled: ImageSet | None
    fingerprint: str


def _groups_of(cfg: ExplainConfig, manifest: dict | None) -> tuple[dict, dict | None]:
    """``(grouping, the one the distilled set records)``: ``--groups``, else the set's own ``grouped:`` source."""
    recorded = None
    spec = str((manifest or {}).get("data") or "")
    if spec.startswith("grouped:"):
        recorded = parse_grouped(spec.removeprefix("grouped:"))[0]
    groups = dict(cfg.groups) or recorded
    if not groups:
        raise DistillError("no grouping of the fine classes: pass --groups '{GROUP: [class, ...], ...}' (or explain "
                           "against a set distilled from a grouped: source, which records it).")
    return groups, recorded


def plan(cfg: ExplainConfig) -> Task:
    """Load and check everything before any attribution: classes, groups, distilled set, image size, gradients."""
    from distillset.squeeze.checkpoint import load_teacher
    from distillset.squeeze.data import channel_stats

    if not cfg.teachers:
        raise DistillError("explain needs the fine classifier: pass --teachers PATH (a squeeze folder).")
    if not cfg.data:
        raise DistillError("explain needs the fine-labelled data: pass --data SPEC (its test split is explained).")
    source = Source(cfg.data)
    train, test = source.load("train"), source.load("test")
    teachers = [load_teacher(t, None) for t in cfg.teachers]
    t0 = teachers[0]
    for spec, t in zip(cfg.teachers, teachers):
        names = t.config.class_names
        if t.config.num_classes != test.num_classes or (names and list(names) != test.class_names):
            raise DistillError(f"teacher {spec} predicts {t.config.num_classes} classes {list(names)[:4]}... but "
                               f"{cfg.data} has {test.num_classes} ({test.class_names[:4]}...); explain a classifier "
                               "of these fine classes.")
        if (t.config.in_chans, t.config.img_size) != (t0.config.in_chans, t0.config.img_size):
            raise DistillError(f"teacher {spec} takes {t.config.img_size}px images, {cfg.teachers[0]} "
                               f"{t0.config.img_size}px; explain teachers of one input size together.")
    c, size = t0.config.in_chans, t0.config.img_size
    if test.image_shape[0] != c:
        raise DistillError(f"the teacher takes {c}-channel images but {cfg.data} has {test.image_shape[0]}.")
    if test.image_shape[-1] != size:
        from distillset.core.data import resize_uint8

        test = ImageSet(resize_uint8(test.images, size), test.labels, test.class_names)
    distilled, manifest = (None, None)
    if cfg.distilled:
        distilled, manifest = load_distilled(cfg.distilled)
    groups, recorded = _groups_of(cfg, manifest)
    fine_to_coarse = torch.tensor(group_index(groups, test.class_names, "the grouping (--groups)"))
    group_names = list(groups)
    if recorded is not None and cfg.groups:
        mine = fine_to_coarse.tolist()
        theirs = group_index(recorded, test.class_names, f"the grouping recorded by {cfg.distilled}")
        if mine != theirs or list(recorded) != group_names:
            bad = next((test.class_names[c] for c in range(len(mine)) if mine[c] != theirs[c]), group_names[0])
            raise DistillError(f"--groups differs from the grouping {cfg.distilled} was distilled with (e.g. at "
                               f"'{bad}'); leave --groups out to use the set's own, or distil with these groups.")
    if distilled is not None:
        if distilled.class_names != group_names:
            raise DistillError(f"the distilled set {cfg.distilled} has classes {distilled.class_names[:6]}, not the "
                               f"coarse groups {group_names[:6]}; distil the data grouped by them (recover --data "
                               "'grouped:{groups: ..., data: SPEC}').")
        if distilled.image_shape != (c, size, size):
            shape = "x".join(map(str, distilled.image_shape))
            raise DistillError(f"the distilled set {cfg.distilled} holds {shape} images but the classifier takes "
                               f"{c}x{size}x{size}; distil at the classifier's image size (recover --image-size "
                               f"{size}).")
        missing = [g for k, g in enumerate(group_names) if not bool((distilled.labels == k).any())]
        if missing:
            raise DistillError(f"the distilled set {cfg.distilled} has no image of group '{missing[0]}'; finish or "
                               "re-run its recover command.")
    probe = test.images[:8].float().div(255)
    for spec, t in zip(cfg.teachers, teachers):
        check_gradients(Target(t, cfg.output), probe, f"teacher {spec}")
    mean = channel_stats(train.images)[0]
    key = {"config": fingerprint(cfg, NON_SEMANTIC), "teachers": [t.sha256 for t in teachers],
           "distilled": (manifest or {}).get("fingerprint"), "groups": groups}
    import hashlib

    fp = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Task(teachers, test, mean, fine_to_coarse, group_names, distilled, fp)


def draw(test: ImageSet, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` random test indices of every fine class (fewer where a class has fewer), a function of seed."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(test.num_classes):
        pool = torch.nonzero(test.labels == c).flatten()
        idx.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
    return torch.cat(idx)


def rng(seed: int, purpose: str) -> torch.Generator:
    """A generator per (seed, purpose): the uniform baseline, the metrics' perturbations and the random-order
    reference each draw their own numbers, so none depends on which baselines are listed or in what order, and
    every baseline meets the same infidelity and sensitivity perturbations (a paired comparison)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(purpose.encode()) % 1_000_003)


def batched(fn, n: int, batch: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``batch``-sized slices of ``tensors`` (first dimension ``n``), concatenated."""
    return torch.cat([fn(*(t[i:i + batch] for t in tensors)) for i in range(0, n, batch)])


def measure(cfg: ExplainConfig, f: nn.Module, teacher: nn.Module, x: torch.Tensor, base: torch.Tensor,
            target: torch.Tensor, fills: dict[str, torch.Tensor], box: torch.Tensor, seed: int) -> dict:
    """IG of ``x`` against ``base`` and every faithfulness metric of it, one value per image."""
    n, b = len(x), cfg.batch_size
    parts = [integrated_gradients(f, x[i:i + b], base[i:i + b], target[i:i + b], cfg.n_steps, cfg.ig_method, b)
             for i in range(0, n, b)]
    attr, delta = torch.cat([a for a, _ in parts]), torch.cat([d for _, d in parts])
    def at_target(xs, ts):
        return f(xs).gather(1, ts[:, None]).squeeze(1)

    with torch.no_grad():
        fx, fb = batched(at_target, n, b, x, target), batched(at_target, n, b, base, target)
    out = {"attr": attr, "f_x": fx, "f_baseline": fb, "abs_delta": delta.abs(),
           "rel_delta": delta.abs() / (fx - fb).abs().clamp_min(1e-12), "object_mass": object_mass(attr, box)}
    scores = pixel_scores(attr)
    for fill, fv in fills.items():
        _, _, out[f"deletion_{fill}"], out[f"insertion_{fill}"] = deletion_insertion(teacher, x, fv, scores, target,
                                                                                     cfg.curve_steps)
    g = rng(seed, "metrics")
    nan = torch.full((n,), math.nan)
    out["infidelity"] = (infidelity_score(f, x, attr, target, cfg.infidelity_samples, cfg.infidelity_std, g)
                         if cfg.infidelity_samples else nan)
    out["sensitivity"] = (batched(lambda xs, bs, ts: sensitivity_score(f, xs, bs, ts, cfg.sensitivity_samples,
                                                                       cfg.sensitivity_radius, cfg.n_steps,
                                                                       cfg.ig_method, g), n, b, x, base, target)
                          if cfg.sensitivity_samples else nan)
    return out


def explain_one(cfg: ExplainConfig, task: Task, teacher, seed: int) -> tuple[list[dict], dict]:
    """Every image x baseline of one (teacher, seed): the per-image rows and the tensors the example PNGs show."""
    idx = draw(task.test, cfg.images_per_class, seed)
    x = task.test.images[idx].float().div(255)
    labels = task.test.labels[idx]
    f = Target(teacher, cfg.output)
    with torch.no_grad():
        pred = batched(lambda xs: teacher(xs).argmax(1), len(x), cfg.batch_size, x)
    target = pred if cfg.target == "predicted" else labels
    coarse = task.fine_to_coarse[target]
    h, w = x.shape[-2:]
    sigma = cfg.blur_sigma or min(h, w) / 8
    dist_img, dist_idx = (distilled_baseline(teacher, x, coarse, task.distilled, cfg.pick)
                          if "distilled" in cfg.baselines else (None, None))
    baselines = make_baselines(cfg.baselines, x, task.mean, sigma, rng(seed, "uniform"), dist_img)
    fills = {name: make_baselines([name], x, task.mean, sigma, None, None)[name] for name in cfg.fills}
    box = box_mask(h, w, cfg.object_box)
    names = task.test.class_names
    common = [{"teacher": teacher.path or teacher.config.arch, "seed": seed, "image": int(idx[k]),
               "label": names[int(labels[k])], "target": names[int(target[k])],
               "coarse": task.group_names[int(coarse[k])]} for k in range(len(x))]
    rows: list[dict] = []
    shown: dict = {"x": x[:cfg.examples], "target": target[:cfg.examples], "label": labels[:cfg.examples],
                   "baselines": {}, "attr": {}}
    for name, base in baselines.items():
        m = measure(cfg, f, teacher, x, base, target, fills, box, seed)
        for k in range(len(x)):
            row = {**common[k], "baseline": name, **{key: float(v[k]) for key, v in m.items() if key != "attr"}}
            if name == "distilled":
                row["distilled_index"] = int(dist_idx[k])
            rows.append(row)
        shown["baselines"][name] = base[:cfg.examples]
        shown["attr"][name] = m["attr"][:cfg.examples]
    # a reference without any attribution: pixels removed in random order (what a map must beat)
    ref = [{**c, "baseline": "random order (reference)"} for c in common]
    g = rng(seed, "reference")
    for fill, fv in fills.items():
        _, _, d_auc, i_auc = deletion_insertion(teacher, x, fv, torch.rand(len(x), h * w, generator=g), target,
                                                cfg.curve_steps)
        for k, r in enumerate(ref):
            r.update({f"deletion_{fill}": float(d_auc[k]), f"insertion_{fill}": float(i_auc[k])})
    return rows + ref, shown


def metric_names(cfg: ExplainConfig) -> list[str]:
    curves = [f"{kind}_{fill}" for fill in cfg.fills for kind in ("deletion", "insertion")]
    return [*curves, *METRICS]


def summarize(cfg: ExplainConfig, rows: list[dict]) -> dict:
    """Mean +- std over images, seeds and teachers of every metric, per baseline (and the random-order reference)."""
    out = {}
    names = [*cfg.baselines, "random order (reference)"]
    for name in names:
        sel = [r for r in rows if r["baseline"] == name]
        out[name] = {m: mean_std([r[m] for r in sel if r.get(m) is not None]) for m in metric_names(cfg)
                     if any(r.get(m) is not None for r in sel)}
    return out


BETTER_HIGH = ("insertion", "object_mass")  # metrics where higher is better (prefixes); the rest: lower is better


def paired(cfg: ExplainConfig, rows: list[dict], of: str = "distilled", others: list[str] | None = None) -> dict:
    """``of`` against every other baseline (``others``, default the config's) on the same (teacher, seed, image):
    per metric, the mean +- std of the difference ``of - other`` and the fraction of images where ``of`` is better
    (ties count half)."""
    by = {(r["teacher"], r["seed"], r["image"], r["baseline"]): r for r in rows}
    mine = [r for r in rows if r["baseline"] == of]
    out = {}
    for other in (b for b in (cfg.baselines if others is None else others) if b != of):
        res = {}
        for m in metric_names(cfg):
            if m == "abs_delta" or m == "rel_delta":
                continue  # completeness error is a property of the integral, not a ranking between baselines
            diffs = []
            for r in mine:
                o = by.get((r["teacher"], r["seed"], r["image"], other))
                if o is not None and math.isfinite(r.get(m, math.nan)) and math.isfinite(o.get(m, math.nan)):
                    diffs.append(r[m] - o[m])
            if diffs:
                sign = 1 if m.startswith(BETTER_HIGH) else -1
                wins = sum(1.0 if sign * d > 0 else 0.5 if d == 0 else 0.0 for d in diffs)
                res[m] = {**mean_std(diffs), "better": wins / len(diffs)}
        out[f"{of} - {other}"] = res
    return out


def format_paired(cfg: ExplainConfig, pairs: dict) -> str:
    """The paired table: difference (mean +- std over images) and the fraction of images where the first is
    better."""
    cols = [m for m in metric_names(cfg) if m not in ("abs_delta", "rel_delta")]
    lines = ["| paired (same images) | " + " | ".join(_head(m) for m in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, metrics in pairs.items():
        cells = [f"{metrics[m]['mean']:+.3g} +- {metrics[m]['std']:.2g} (better on {100 * metrics[m]['better']:.0f} %)"
                 if m in metrics else "" for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEADERS = {"abs_delta": "|delta|", "rel_delta": "|delta| / |f(x)-f(b)|", "infidelity": "infidelity (lower)",
           "sensitivity": "sensitivity (lower)", "object_mass": "mass in box (higher)"}


def _head(m: str) -> str:
    if m in HEADERS:
        return HEADERS[m]
    kind, fill = m.split("_", 1)
    return f"{kind} AUC, {fill} fill ({'lower' if kind == 'deletion' else 'higher'})"


def format_table(cfg: ExplainConfig, summary: dict, chance: float) -> str:
    """A markdown table: one row per baseline, mean +- std of every metric."""
    cols = metric_names(cfg)
    lines = ["| baseline | " + " | ".join(_head(m) for m in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, metrics in summary.items():
        cells = []
        for m in cols:
            s = metrics.get(m)
            cells.append("" if not s or s["mean"] is None else f"{s['mean']:.3g} +- {s['std']:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nmass in box of a uniform map (chance): {chance:.3f}"


def write_rows(path: Path, cfg: ExplainConfig, rows: list[dict]) -> None:
    cols = ["teacher", "seed", "image", "label", "target", "coarse", "baseline", "f_x", "f_baseline",
            *metric_names(cfg), "distilled_index"]
    write_csv(path, rows, cols, floats=".6g")


def save_example(path: Path, shown: dict, k: int, class_names: list[str]) -> None:
    """One PNG: the input, then for each baseline the baseline image and its attribution heat map (channels
    summed, signed, red = evidence for the target, blue = against)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(shown["baselines"])
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(1.9 * (len(names) + 1), 4.0), squeeze=False)

    def show(ax, img, title):
        a = img.clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray" if a.shape[-1] == 1 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)

    show(axes[0, 0], shown["x"][k], f"input: {class_names[int(shown['label'][k])]}\n"
                                    f"target {class_names[int(shown['target'][k])]}")
    axes[1, 0].axis("off")
    for j, name in enumerate(names, 1):
        show(axes[0, j], shown["baselines"][name][k], f"baseline: {name}")
        heat = shown["attr"][name][k].sum(0).numpy()
        lim = float(abs(heat).max()) or 1.0
        axes[1, j].imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
        axes[1, j].set_title("IG attribution", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run(cfg: ExplainConfig, rt=None) -> dict:
    """Explain every (teacher, seed) against every baseline; write explain.json/.csv, summary.md, examples/."""
    rt = rt or get_runtime()
    t0 = time.perf_counter()
    out = require_folder(cfg.out)
    task = plan(cfg)
    done = finished_record(out / "explain.json", task.fingerprint, "an explanation run",
                           lambda old: config_diff(old.get("config"), to_dict(cfg), NON_SEMANTIC))
    if done is not None:
        log.info("explain: %s is already finished; nothing to do", out)
        return done
    rows: list[dict] = []
    for ti, teacher in enumerate(task.teachers):
        for s in range(cfg.seeds):
            seed = cfg.seed + s
            part = out / "parts" / f"teacher{ti}_seed{seed}.json"
            if part.exists():  # a finished (teacher, seed) of this very run is kept, not recomputed
                rec = json.loads(part.read_text())
                if rec.get("fingerprint") == task.fingerprint:
                    rows += rec["rows"]
                    continue
            log.info("explain: teacher %d/%d, seed %d", ti + 1, len(task.teachers), seed)
            part_rows, shown = explain_one(cfg, task, teacher, seed)
            if ti == 0 and s == 0 and rt.is_main:
                for k in range(len(shown["x"])):
                    save_example(out / "examples" / f"example_{k:02d}.png", shown, k, task.test.class_names)
            if rt.is_main:
                write_json(part, {"fingerprint": task.fingerprint, "rows": part_rows})
            rows += part_rows
    chance = float(box_mask(*task.test.image_shape[1:], cfg.object_box).float().mean())
    summary = summarize(cfg, rows)
    pairs = paired(cfg, rows) if "distilled" in cfg.baselines and len(cfg.baselines) > 1 else {}
    result = {"summary": summary, "paired": pairs, "object_box_chance": chance, "groups": dict(zip(task.group_names, [
        [task.test.class_names[c] for c in range(task.test.num_classes) if int(task.fine_to_coarse[c]) == g]
        for g in range(len(task.group_names))])), "images": len({(r["seed"], r["image"]) for r in rows}),
        "teachers": [t.describe() for t in task.teachers], "fingerprint": task.fingerprint,
        "seconds": time.perf_counter() - t0, "config": to_dict(cfg)}
    if rt.is_main:
        write_json(out / "explain.json", result)
        write_rows(out / "explain.csv", cfg, rows)
        table = format_table(cfg, summary, chance) + ("\n\n" + format_paired(cfg, pairs) if pairs else "")
        write_text(out / "summary.md", table + "\n")
        write_config(out, cfg)
        log.info("explain:\n%s", table)
    rt.wait()
    return result
