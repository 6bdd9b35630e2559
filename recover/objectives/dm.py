"""Distribution Matching (DM, Zhao & Bilen 2023).

Each step draws a randomly initialised ConvNet and, for every class of the unit, matches the mean embedding
(``ConvNet.embed``: the flattened last feature map) of a real batch of that class to the mean embedding of the
class's synthetic images, both under the same DSA draw: ``sum_c || mean f(A(real_c)) - mean f(A(syn_c)) ||^2``.
There is no bi-level loop and classes do not interact, so units can be class blocks sharded across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.recover.objectives._matching import MatchingConfig, Normalize, SiameseAugmenter, class_positions


def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.embed(x) if hasattr(net, "embed") else net(x)


@register_objective("dm", paper="Zhao & Bilen 2023, Dataset Condensation with Distribution Matching "
                    "(arXiv:2110.04181)")
class DistributionMatching(Objective):
    """DM: per-class mean-embedding matching under freshly sampled random networks."""

    @dataclass
    class Config(MatchingConfig):
        """Options of DM: ``batch_real``, the Siamese ``aug`` (dsa by default) and the networks (``arch``, ``width``,
        Acc-DD's ``model_pool``/``perturb`` instead of fresh random networks)."""

    needs_real = True
    joint_classes = False

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.batch_real = self.cfg.batch_real
        self.augmenter = SiameseAugmenter(self.cfg.aug, self.cfg.aug_options)
        self.source = self.cfg.net_source()
        self._logs: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        self.norm = Normalize(ctx).to(ctx.device)

    def class_gaps(self, syn: Parametrization, ctx: Context, net: torch.nn.Module) -> list[torch.Tensor]:
        """Squared mean-embedding gap of every class of the unit under ``net`` (one DSA draw per class)."""
        gaps = []
        for c, pos in class_positions(syn.labels):
            real = ctx.real.sample(c, self.batch_real, ctx.generator)
            real, x_syn = self.augmenter.pair(real, syn.render(pos), ctx)
            with ctx.autocast():
                with torch.no_grad():
                    mu_real = embed(net, self.norm(real)).float().mean(0)
                mu_syn = embed(net, self.norm(x_syn)).float().mean(0)
            gaps.append(((mu_real - mu_syn) ** 2).sum())
        return gaps

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        net = self.source.sample(ctx)
        for p in net.parameters():
            p.requires_grad_(False)
        total = torch.stack(self.class_gaps(syn, ctx, net)).sum()
        self._logs = {"gap": float(total.detach())}
        return total

    def logs(self) -> dict[str, float]:
        return dict(self._logs)
