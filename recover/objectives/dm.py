"""Distribution Matching (DM, Zhao & Bilen 2023).

Each step draws a randomly initialised ConvNet and, for every class of the unit, matches the mean embedding
(``ConvNet.embed``: the flattened last feature map) of a real batch of that class to the mean embedding of the
class's synthetic images, both under the same DSA draw: ``sum_c || mean f(A(real_c)) - mean f(A(syn_c)) ||^2``.
There is no bi-level loop and classes do not interact, so units can be class blocks sharded across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.recover.objectives._matching import (
    CompiledNet,
    MatchingConfig,
    Normalize,
    SiameseAugmenter,
    class_positions,
)


def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.embed(x) if hasattr(net, "embed") else net(x)


@register_objective("dm", paper="Zhao & Bilen 2023, Dataset Condensation with Distribution Matching "
                    "(arXiv:2110.04181)")
class DistributionMatching(Objective):
    """DM: per-class mean-embedding matching under freshly sampled random networks."""

    @dataclass
    class Config(MatchingConfig):
        """Options of DM: ``batch_real``, the Siamese ``aug`` (dsa by default) and the networks (``arch``, ``width``,
        Acc-DD's ``model_pool``/``perturb`` instead of fresh random networks).

        Attributes:
            batch_classes: push all classes of a unit through the network in one forward (real) and one (synthetic)
                instead of class by class; the same numbers. Off by default: on the 2-core CPU measured it is slower
                (0.65x at batch_real 32, 0.98x at 256: benchmarks/dm_step.py); large batches pay where small kernel
                launches dominate (GPUs).
            dp_noise: FedDM's Gaussian mechanism on the matched statistic (0 = off): every real embedding is clipped
                to L2 norm ``dp_clip``, and the class's sum gets N(0, (dp_noise x dp_clip)^2) noise before it is
                divided by the batch size; ``dp_noise`` is the noise multiplier an RDP accountant takes (one
                subsampled Gaussian step per step, sample rate batch_real / images of the class).
            dp_clip: the per-example L2 clipping norm of the real embeddings under ``dp_noise``.
        """

        batch_classes: bool = False
        dp_noise: float = 0.0
        dp_clip: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            if self.dp_noise < 0 or self.dp_clip <= 0:
                raise DistillError(f"dp_noise must be >= 0 and dp_clip > 0, got {self.dp_noise} and {self.dp_clip}.")

    needs_real = True
    joint_classes = False
    BATCH_IMAGES = 4096  # real images per batched forward (several classes' batches at once)

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.batch_real = self.cfg.batch_real
        self.augmenter = SiameseAugmenter(self.cfg.aug, self.cfg.aug_options)
        self.source = self.cfg.net_source()
        self._logs: dict[str, torch.Tensor] = {}
        self._compiled: CompiledNet | None = None

    def setup(self, ctx: Context) -> None:
        self.norm = Normalize(ctx).to(ctx.device)
        # one compiled graph per grad mode (real: no autograd, synthetic: with), reused by every drawn network
        self._compiled = CompiledNet("embed", ctx.autocast_dtype, ctx.device.type) if self.cfg.compiles(ctx) else None

    def _embed(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None and hasattr(net, "embed"):
            return self._compiled(net, x)
        return embed(net, x)

    def class_gaps(self, syn: Parametrization, ctx: Context, net: torch.nn.Module,
                   batched: bool | None = None) -> list[torch.Tensor]:
        """Squared mean-embedding gap of every class of the unit under ``net`` (one DSA draw per class).

        The augmented batches of all classes go through ``net`` in one forward for the real images (no autograd) and
        one for the synthetic ones (option ``batch_classes``), then are split by class: the same numbers as class by
        class (same draws, same order) in two large passes instead of 2 x classes small ones. A network with
        BatchNorm would mix the classes' statistics, so it keeps the per-class passes (``batched`` forces a path)."""
        if batched is None:
            batched = self.cfg.batch_classes and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                         for m in net.modules())
        reals, syns = [], []
        for c, pos in class_positions(syn.labels):
            real = ctx.real.sample(c, self.batch_real, ctx.generator)
            real, x_syn = self.augmenter.pair(real, syn.render(pos), ctx)
            reals.append(real)
            syns.append(x_syn)
        if not batched:
            return [self._gap(net, [r], [s], ctx)[0] for r, s in zip(reals, syns)]
        gaps, start = [], 0
        while start < len(reals):  # groups of classes up to BATCH_IMAGES real images: memory stays bounded
            end, n = start, 0
            while end < len(reals) and (end == start or n + len(reals[end]) <= self.BATCH_IMAGES):
                n += len(reals[end])
                end += 1
            gaps += self._gap(net, reals[start:end], syns[start:end], ctx)
            start = end
        return gaps

    def _gap(self, net, reals: list[torch.Tensor], syns: list[torch.Tensor], ctx: Context) -> list[torch.Tensor]:
        """The per-class gaps of the given batches, through one real and one synthetic forward."""
        with ctx.autocast():
            with torch.no_grad():  # the real side needs no graph: no activations kept, no backward
                emb_real = self._embed(net, self.norm(torch.cat(reals))).float()
            emb_syn = self._embed(net, self.norm(torch.cat(syns))).float()
        mu_real = [self._real_mean(e, ctx) for e in emb_real.split([len(r) for r in reals])]
        mu_syn = [e.mean(0) for e in emb_syn.split([len(s) for s in syns])]
        return [((a - b) ** 2).sum() for a, b in zip(mu_real, mu_syn)]

    def _real_mean(self, emb: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The class's mean real embedding; under ``dp_noise`` the clipped sum plus Gaussian noise, over the batch."""
        if not self.cfg.dp_noise:
            return emb.mean(0)
        clip = self.cfg.dp_clip
        scale = (clip / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        noise = torch.randn(emb.shape[1], generator=ctx.generator).to(emb.device) * (self.cfg.dp_noise * clip)
        return ((emb * scale).sum(0) + noise) / len(emb)

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        net = self.source.sample(ctx)
        for p in net.parameters():
            p.requires_grad_(False)
        total = torch.stack(self.class_gaps(syn, ctx, net)).sum()
        self._logs = {"gap": total.detach()}  # read (a host sync on GPUs) only when the engine logs
        return total

    def logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._logs.items()}
