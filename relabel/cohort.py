"""Students trained together: a cohort of k students of one architecture as one wide network.

A small student on tiny images (the digits demo's ConvNet on 8x8 images, batch 10) spends most of each step in
per-op overhead, not arithmetic. A cohort stacks k such students (seeds, and the distilled and random-real sets of one
evaluation) into one network whose every layer holds the k students side by side: convolutions become grouped
convolutions (group i is student i), instance norm becomes a GroupNorm with k times the groups, BatchNorm keeps one
channel's statistics per channel (so per student), and the classifier is one batched matmul. One forward, backward and
optimiser step then trains all k; every operation stays within one student's channels, so the math is each
student's own.

Each student keeps its own :class:`~distillset.relabel.student.Feed` (image order, augmentation draws, loss) from its
own seed, and its init is the one :func:`~distillset.relabel.student.init_student` gives that seed, so a cohort
member equals the student trained alone with the same seed up to float rounding (grouped kernels sum in another
order; ``tests/test_cohort.py``). The augmentation runs batched too: the crops of all students in one call, DSA as one
call per op family drawn in the step (at most seven) instead of one per student.

Which architectures widen: the ConvNet family, VGG-11, the small AlexNet and the sigmoid LeNet (a ``features``
stack of convolutions, norms, activations and pools, then one linear layer). Others train one at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distillset.core.data import ImageSet
from distillset.core.runtime import autocast_dtype
from distillset.relabel.softlabels import SoftLabels
from distillset.relabel.student import Feed, StudentSpec, check_spec, compiled, init_student, optimizer
from distillset.squeeze.augment import affine_crop
from distillset.squeeze.dsa import SiameseAug, apply_family, family_params
from distillset.squeeze.inputs import ZCA, InputTransform
from distillset.squeeze.models import VGG11, AlexNetSmall, ConvNet, LeNetSigmoid

WIDE_ARCHS = (ConvNet, VGG11, AlexNetSmall, LeNetSigmoid)
# layers that act on each channel alone (or not at all): the same module serves k students side by side
CHANNELWISE = (nn.ReLU, nn.Sigmoid, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)
# above this many first-layer activations per student and step, a CPU student is busy with memory-bound passes and a
# cohort gains nothing (ConvNet-3, 32 px, batch 64: 8.4M, 0.76x-1.4x of one at a time over two runs of
# benchmarks/students.py); the digits demo's students (41k) gain 4.3x
CPU_WIDE_LIMIT = 1 << 20


def widens(model: nn.Module) -> bool:
    """Whether ``model`` can join a cohort (a ``features`` stack of supported layers, then one linear layer)."""
    if type(model) not in WIDE_ARCHS:
        return False
    return all(isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d, *CHANNELWISE)) for m in model.features)


def pays_off(model: nn.Module, batch: int, image_size: int, device) -> bool:
    """Whether training students of ``model`` together is faster than one at a time on ``device``: always on an
    accelerator (k small students fill it), on a CPU only while per-op overhead dominates a step."""
    if not widens(model):
        return False
    return torch.device(device).type != "cpu" or small_student(model, batch, image_size)


def small_student(model: nn.Module, batch: int, image_size: int) -> bool:
    """Whether a step of ``batch`` images is small enough that per-op overhead, not memory-bound passes, dominates it
    on a CPU: at most ``CPU_WIDE_LIMIT`` outputs of the first convolution. Such students gain from cohorts and not
    from compiling; larger ones the other way round."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return True
    side = (image_size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    return batch * conv.out_channels * side * side <= CPU_WIDE_LIMIT


class WideNet(nn.Module):
    """k students of one architecture as one network: input ``(B, k*C, H, W)``, logits ``(k, B, classes)``."""

    def __init__(self, students: list[nn.Module]):
        super().__init__()
        self.k = len(students)
        self.features = nn.Sequential(*(_widen(list(mods)) for mods in zip(*(s.features for s in students))))
        heads = [s.classifier for s in students]
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]).clone())  # (k, classes, D)
        self.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]).clone())  # (k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        b = h.shape[0]
        h = h.reshape(b, self.k, -1).transpose(0, 1)  # per student, its channels in (C, H, W) order = flatten(1)
        return torch.baddbmm(self.bias.unsqueeze(1).to(h.dtype), h, self.weight.transpose(1, 2).to(h.dtype))

    @torch.no_grad()
    def student(self, i: int, model: nn.Module) -> nn.Module:
        """Copy student ``i``'s weights and buffers into ``model`` (a fresh one of the architecture)."""
        for wide, mod in zip(self.features, model.features):
            for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                w = getattr(wide, name)
                t.copy_(w if t.ndim == 0 else w.view(self.k, -1, *w.shape[1:])[i])
        model.classifier.weight.copy_(self.weight[i])
        model.classifier.bias.copy_(self.bias[i])
        return model


def _widen(mods: list[nn.Module]) -> nn.Module:
    """One layer of k students as one module (weights concatenated along the channels, student after student)."""
    m, k = mods[0], len(mods)
    if isinstance(m, CHANNELWISE):
        return m
    if isinstance(m, nn.Conv2d):
        wide = nn.Conv2d(m.in_channels * k, m.out_channels * k, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups * k, m.bias is not None, m.padding_mode)
    elif isinstance(m, nn.GroupNorm):  # each student's groups are contiguous channels: k times the groups
        wide = nn.GroupNorm(m.num_groups * k, m.num_channels * k, m.eps, m.affine)
    else:
        wide = nn.BatchNorm2d(m.num_features * k, m.eps, m.momentum, m.affine, m.track_running_stats)
    with torch.no_grad():
        for name, t in list(wide.named_parameters(recurse=False)) + list(wide.named_buffers(recurse=False)):
            parts = [getattr(s, name) for s in mods]
            t.copy_(parts[0] if t.ndim == 0 else torch.cat(parts))
    return wide


def crops_together(xs: torch.Tensor, params: list[dict]) -> torch.Tensor:
    """The crops of every student in one call: ``xs`` (k, B, C, H, W), one crop dict per student."""
    k, b = xs.shape[:2]
    p = {key: torch.cat([q[key] for q in params]).to(xs.device) for key in params[0]}
    x = xs.flatten(0, 1)
    out = affine_crop(x, p["cx"].to(x.dtype), p["cy"].to(x.dtype), p["w"].to(x.dtype), p["h"].to(x.dtype), p["flip"])
    return out.view(k, b, *out.shape[1:])


def augment_together(xs: torch.Tensor, augs: list, dsa: SiameseAug | None) -> torch.Tensor:
    """Each student's drawn augmentation (:meth:`Feed.batch`) on its images ``xs[i]``, one call per kind: students
    of one protocol may still differ (under ``plain``, soft labels bring their crops and hard labels none)."""
    for kind in ("crop", "dsa"):
        idx = [i for i, a in enumerate(augs) if a is not None and a[0] == kind]
        if idx:
            params = [augs[i][1] for i in idx]
            xs[idx] = crops_together(xs[idx], params) if kind == "crop" else dsa_together(xs[idx], params, dsa)
    return xs


def dsa_together(xs: torch.Tensor, params: list[dict], dsa: SiameseAug) -> torch.Tensor:
    """DSA (one op family per student and step, per-image parameters) as one call per family drawn: every DSA op
    treats each image alone, so the images of all students that drew a family go through it at once."""
    out = torch.empty_like(xs)
    ops = dsa.ops
    chosen = [[int(i) for i in p["ops"].tolist()] for p in params]
    for family in sorted({tuple(c) for c in chosen}):
        members = [s for s, c in enumerate(chosen) if tuple(c) == family]
        x = xs[members].flatten(0, 1)
        for i in family:
            drawn = [family_params(params[s], i) for s in members]
            p = {key: torch.cat([d[key] for d in drawn]) for key in drawn[0]}
            x = apply_family(x, ops[i], p, dsa.ratios)
        out[members] = x.view(len(members), *xs.shape[1:])
    return out


def fit_students(sets: list[tuple[ImageSet, SoftLabels | None, torch.Tensor | None]], spec: StudentSpec, mean, std,
                 seeds: list[int], device, zca: ZCA | None = None, on_epoch=None) -> list[nn.Module]:
    """Train k fresh students as one cohort and return them (eval mode), each equal to
    :func:`~distillset.relabel.student.fit_student` with its seed, set and labels.

    Args:
        sets: per student, ``(images, soft labels or None, fixed soft targets or None)``; every set holds the same
            number of images (the cohort steps together).
        spec: the students' one recipe (architecture, protocol, epochs, batch size, lr).
        mean, std: input normalisation.
        seeds: per student, its seed.
        device: where they train.
        zca: the whitening of every student's inputs.
        on_epoch: called with the number of students after every epoch (a progress bar).
    """
    if len(sets) != len(seeds) or not seeds:
        raise ValueError("fit_students needs one (set, labels) per seed")
    if len({len(s[0]) for s in sets}) != 1:
        raise ValueError("students of one cohort train on sets of equal size")
    for s in sets:
        check_spec(spec, s[1])
    models = [init_student(s[0], spec, seed, device) for s, seed in zip(sets, seeds)]
    wide = WideNet(models).to(device)
    caches: dict[int, dict] = {}  # per label set, the stored crops of the current epoch
    feeds = [Feed(images, spec, seed, device, soft, targets, caches.setdefault(id(soft), {}))
             for (images, soft, targets), seed in zip(sets, seeds)]
    opt, sched = optimizer(wide.parameters(), spec, feeds[0].total_steps, device)
    amp = autocast_dtype(spec.autocast, torch.device(device))
    norm = InputTransform(mean, std, zca).to(device)
    k = len(feeds)
    wide.train()
    forward = compiled(wide, spec)
    for epoch in range(spec.epochs):
        for f in feeds:
            f.start_epoch(epoch)
        for step in range(feeds[0].steps_per_epoch):
            drawn = [f.batch(step) for f in feeds]
            xs = torch.stack([x for x, _ in drawn])  # (k, B, C, H, W)
            xs = augment_together(xs, [a for _, a in drawn], feeds[0].dsa)
            b = xs.shape[1]
            x = norm(xs.flatten(0, 1)).view(k, b, *xs.shape[2:])
            x = x.transpose(0, 1).reshape(b, k * xs.shape[2], *xs.shape[3:])  # student i in channels [iC, (i+1)C)
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                logits = forward(x).float()
            # the students' parameters are disjoint: the gradient of the sum is each student's own gradient
            losses = [f.loss(z) for f, z in zip(feeds, logits)]
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(k)
    for loss in losses:
        Feed.check_finite(loss)
    wide.eval()
    return [wide.student(i, m).eval() for i, m in enumerate(models)]  # the inits, overwritten by what was learned


def cohorts(n: int, limit: int) -> list[range]:
    """``n`` students in consecutive cohorts of at most ``limit`` (sizes as even as possible)."""
    parts = max(1, math.ceil(n / max(1, limit)))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(range(start, start + size))
        start += size
    return out
