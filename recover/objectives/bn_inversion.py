"""SRe2L BatchNorm-statistics inversion (and the multi-teacher rotation G-VBSM builds on).

loss = CE(teacher(aug(x)), y) + r_bn * BN, with BN the batch mean/variance of each BatchNorm input matched to the
layer's running statistics (L2 distances), the first BN layer weighted ``first_bn_mult`` times.

``bn_norm="rms"`` (default) divides each layer's distances by sqrt(channels) and averages over layers, so the BN
term has the same scale on a ConvNet, a ResNet-18 or a ResNet-50 and one ``r_bn`` transfers between backbones;
``bn_norm="sum"`` is SRe2L's raw sum (use its ``r_bn = 0.01``).

``class_aware = w > 0`` is EDC's soft category-aware matching (Shao et al., NeurIPS'24): the statistics of each
class's synthetic images at every BN input are also matched to that class's real statistics (measured once per run
with the teacher on up to ``class_stats_images`` real images per class), and the BN term becomes
``(1 - w) x global + w x class-wise`` (mean over the unit's classes). The running statistics describe all classes
at once: a batch of one class matched to them alone is pushed towards the average of all classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Objective, Parametrization, register_objective


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and population variance over every dim but 1, in fp32, with a closed-form backward.

    Autograd through ``torch.var_mean`` costs several full-size temporaries; here the forward is BatchNorm's own
    statistics kernel where it gives fp32 results (:func:`_fused_moments`), else two reductions of ``x - shift`` (a
    per-channel shift near the mean keeps E[d^2] - E[d]^2 accurate; a channels-last 4-D input is reduced as the
    (N*H*W, C) matrix it already is), and the backward is one fused ``a + b * x`` per element.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor):
        mean, var = _fused_moments(x) or _shifted_moments(x, shift)
        ctx.save_for_backward(x, mean)
        ctx.count = x.numel() // x.shape[1]
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor):
        x, mean = ctx.saved_tensors
        scale = grad_var * (2.0 / ctx.count)
        bias = grad_mean / ctx.count - scale * mean
        view = [1, -1] + [1] * (x.ndim - 2)
        return torch.addcmul(bias.to(x.dtype).view(view), x, scale.to(x.dtype).view(view)), None


def _shifted_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(mean, population var)`` per channel as two reductions of ``x - shift`` (the explicit path)."""
    # a bf16/fp16 x minus the fp32 shift is promoted and computed in fp32 in one pass (no separate upcast copy)
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        d = torch.sub(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), shift)  # the (N*H*W, C) view, no copy
        mean_d, sq = d.mean(0), d.square().mean(0)
    else:
        dims = [0] + list(range(2, x.ndim))
        d = torch.sub(x, shift.view([1, -1] + [1] * (x.ndim - 2)))
        mean_d, sq = d.mean(dims), d.square().mean(dims)
    return mean_d + shift, (sq - mean_d.square()).clamp_min(0)


def _fused_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 ``(mean, population var)`` per channel from BatchNorm's own statistics kernel, or None where it is not
    available.

    ``torch.batch_norm_update_stats`` (the kernel behind BatchNorm's training statistics) takes a pass for the mean
    and one for the centred squares, without the full-size fp32 temporaries of the reduction written in Python:
    ~3-4x faster on a CPU (fp32 or bf16, either layout). Given fp32 running buffers it returns fp32 statistics for a
    bf16 input too (without them it would round them to bf16); momentum 0 leaves those throwaway buffers as they
    are. Compiled graphs call it too: it measured ~9 % faster per ResNet-18 step than inductor's own fused
    reduction of the explicit path (benchmarks/recover_throughput.py --compile).
    """
    c = x.shape[1] if x.ndim >= 2 else 0
    if not c or x.numel() < 2 * c:  # the kernel needs 2+ values per channel
        return None
    buffers = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    try:
        mean, var = torch.batch_norm_update_stats(x, *buffers, 0.0)
    except (RuntimeError, NotImplementedError):  # a backend without the kernel
        return None
    if mean.dtype != torch.float32 or var.dtype != torch.float32:
        return None
    return mean, var


def channel_moments(x: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-channel ``(mean, var)`` of ``x`` (N, C, ...) over all dims but 1 (population variance).

    ``shift`` (C,), e.g. the running mean, only improves accuracy; the result does not depend on it.
    """
    if shift is None:
        shift = x.detach()[:1].float().mean(dim=[0] + list(range(2, x.ndim)))
    return _ChannelMoments.apply(x, shift.detach().float())


class BNStatHook:
    """Forward hook on one BatchNorm layer: distance of the batch statistics of its input to the running ones.

    With ``groups`` set (``[(class, positions)]``) and ``class_stats`` known for those classes, ``class_value`` is
    the mean over the groups of the same distance between a group's statistics and its class's real ones.
    ``record`` (a list) makes the hook collect ``(mean, var)`` of the input instead, for measuring real statistics.
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, normalise: bool):
        self.module = module
        self.scale = module.num_features ** -0.5 if normalise else 1.0
        self.value: torch.Tensor | None = None
        self.class_value: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] | None = None
        self.class_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.record: list | None = None
        self.handle = module.register_forward_hook(self.hook)

    def distance(self, mean, var, rm, rv) -> torch.Tensor:
        return (torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)) * self.scale

    def hook(self, module, inputs, output):
        rm, rv = module.running_mean.float(), module.running_var.float()
        if self.record is not None:
            self.record.append(channel_moments(inputs[0].detach(), rm))
            return
        mean, var = channel_moments(inputs[0], rm)  # fp32 statistics even under bf16 autocast
        self.value = self.distance(mean, var, rm, rv)
        self.class_value = None
        if self.groups:
            terms = []
            for c, pos in self.groups:
                cm, cv = self.class_stats[c]
                m_c, v_c = channel_moments(inputs[0][pos.to(inputs[0].device)], cm)
                terms.append(self.distance(m_c, v_c, cm, cv))
            self.class_value = torch.stack(terms).mean()

    def remove(self):
        self.handle.remove()


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@register_objective("sre2l", paper="Yin et al. 2023, Squeeze, Recover and Relabel: Dataset Condensation at ImageNet "
                    "Scale From A New Perspective (arXiv:2306.13092)")
class BNInversion(Objective):
    """SRe2L recover: cross-entropy + weighted BatchNorm statistics matching (teachers used in turn)."""

    @dataclass
    class Config:
        """Options of BN inversion.

        Attributes:
            r_bn: weight of the BN term (default 1.0 with ``bn_norm="rms"``; SRe2L used 0.01 with ``"sum"``).
            first_bn_mult: extra weight of the first BN layer (SRe2L: 10).
            bn_norm: ``rms`` (per-architecture normalisation) or ``sum`` (SRe2L's raw sum).
            ce_weight: weight of the cross-entropy term.
            class_aware: EDC's soft category-aware matching weight w in [0, 1]: BN term = (1 - w) x global +
                w x per-class (each class's synthetic statistics against its real ones); 0 = SRe2L (off). Needs
                --data (the real images whose per-class statistics are measured).
            class_stats_images: real images per class measured for the class-wise statistics.
        """

        r_bn: float = 1.0
        first_bn_mult: float = 10.0
        bn_norm: str = "rms"
        ce_weight: float = 1.0
        class_aware: float = 0.0
        class_stats_images: int = 256

        def __post_init__(self):
            if self.bn_norm not in ("rms", "sum"):
                raise DistillError(f"unknown bn_norm '{self.bn_norm}'; use rms or sum.")
            if not 0 <= self.class_aware <= 1:
                raise DistillError(f"class_aware is a weight in [0, 1] (EDC's soft category-aware matching; 0 = off), "
                                   f"got {self.class_aware}.")
            if self.class_stats_images < 1:
                raise DistillError(f"class_stats_images must be >= 1, got {self.class_stats_images}.")

    needs_teacher = True
    needs_bn = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.r_bn, self.first_bn_mult, self.bn_norm, self.ce_weight = c.r_bn, c.first_bn_mult, c.bn_norm, c.ce_weight
        self.hooks: list[list[BNStatHook]] = []
        self._logs: dict[str, torch.Tensor] = {}
        # (teacher, class) -> per BN layer (mean, var) of real images: measured once per run, kept across units
        self._class_stats: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def uses_real(self) -> bool:
        return self.cfg.class_aware > 0

    def setup(self, ctx: Context) -> None:
        self.teardown()
        for t in ctx.teachers:
            layers = bn_layers(t.model)
            if not layers:
                raise DistillError(f"teacher {t.config.arch} has no BatchNorm layer, so BN inversion has no "
                                   "statistics to match; use a BatchNorm backbone (e.g. convnet_bn, resnet18_cifar).")
            self.hooks.append([BNStatHook(m, self.bn_norm == "rms") for m in layers])
        if self.cfg.class_aware > 0:
            for c in torch.unique(ctx.classes).tolist():
                for k in range(len(ctx.teachers)):
                    stats = self.real_class_stats(ctx, k, int(c))
                    for h, st in zip(self.hooks[k], stats):
                        h.class_stats[int(c)] = st

    @torch.no_grad()
    def real_class_stats(self, ctx: Context, k: int, c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per BN layer ``(mean, var)`` of teacher ``k``'s inputs on real images of class ``c`` (the first
        ``class_stats_images`` of the class's seeded order, so every process and unit layout measures the same)."""
        if (k, c) not in self._class_stats:
            from distillset.core.partition import init_order

            idx = init_order(ctx.real.index[c], c, ctx.seed)[:self.cfg.class_stats_images]
            hooks = self.hooks[k]
            parts: list[list] = [[] for _ in hooks]
            for s in range(0, len(idx), 256):
                for h, part in zip(hooks, parts):
                    h.record = part
                try:
                    ctx.teachers[k](ctx.real.get(idx[s:s + 256]))
                finally:
                    for h in hooks:
                        h.record = None
            n = [min(256, len(idx) - s) for s in range(0, len(idx), 256)]
            stats = []
            for part in parts:  # pool the chunks' moments (weighted by their sizes; variance by the law of total var)
                w = torch.tensor(n, dtype=torch.float32, device=part[0][0].device) / sum(n)
                means = torch.stack([m for m, _ in part])
                vars_ = torch.stack([v for _, v in part])
                mean = (w[:, None] * means).sum(0)
                var = (w[:, None] * (vars_ + (means - mean).square())).sum(0)
                stats.append((mean, var))
            self._class_stats[(k, c)] = stats
        return self._class_stats[(k, c)]

    def teacher_index(self, ctx: Context) -> int:
        return ctx.step % len(ctx.teachers)

    def bn_term(self, hooks: list[BNStatHook], attr: str = "value") -> torch.Tensor:
        w = [self.first_bn_mult] + [1.0] * (len(hooks) - 1)
        total = sum(wi * getattr(h, attr) for wi, h in zip(w, hooks))
        return total / sum(w) if self.bn_norm == "rms" else total

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        k = self.teacher_index(ctx)
        x = ctx.augment(syn.render(), ctx)
        w = self.cfg.class_aware
        if w > 0:
            groups = [(int(c), torch.nonzero(syn.labels == c).flatten()) for c in torch.unique(syn.labels).tolist()]
            for h in self.hooks[k]:
                h.groups = groups
        with ctx.autocast():
            logits = ctx.teachers[k](x)
        ce = F.cross_entropy(logits.float(), syn.labels)
        bn = self.bn_term(self.hooks[k])
        self._logs = {"ce": ce.detach(), "bn": bn.detach()}
        if w > 0:
            bn_class = self.bn_term(self.hooks[k], "class_value")
            self._logs["bn_class"] = bn_class.detach()
            bn = (1 - w) * bn + w * bn_class
        return self.ce_weight * ce + self.r_bn * bn

    def logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._logs.items()}

    def teardown(self) -> None:
        for hs in self.hooks:
            for h in hs:
                h.remove()
        self.hooks = []
