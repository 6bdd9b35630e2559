"""CAFE: Condense dataset by Aligning FEatures (Wang et al. 2022).

Two terms per step, on a ConvNet that is trained on the synthetic set in between (DC's bi-level schedule, see
``dc``):

* layer-wise feature alignment: for every class and every block, the squared distance between the mean feature map
  of a real batch and of the synthetic images (same DSA draw);
* discrimination: the synthetic class-mean embeddings act as a linear classifier of the real embeddings
  (logits = <f(real), mean f(syn_c)> / temperature), scored by cross-entropy, so each class's synthetic images stay
  discriminative against the others.

loss = feat_weight * alignment + dis_weight * discrimination. The weights and temperature are ours, not checked
against the authors' code; tune them per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives._matching import (
    MatchingConfig,
    NetSchedule,
    ScheduledNetObjective,
    SiameseAugmenter,
    class_block_features,
)


@register_objective("cafe", paper="Wang et al. 2022, CAFE: Learning to Condense Dataset by Aligning Features "
                    "(arXiv:2203.01531)")
class FeatureAlignment(ScheduledNetObjective):
    """CAFE: layer-wise feature alignment + discrimination loss with synthetic class means as the classifier."""

    @dataclass
    class Config(MatchingConfig):
        """Options of CAFE (besides the matching ones: batch_real, aug, networks as ``dc``).

        Attributes:
            feat_weight: weight of the layer-wise alignment term.
            dis_weight: weight of the discrimination term.
            temperature: divides the discrimination logits (embedding dot products are large on random networks).
            outer_loop: network schedule: steps on one network (0 = DC's per-ipc value).
            inner_loop: network schedule: epochs of training on the synthetic set between steps (0 = DC's).
            lr_net: SGD learning rate of those network updates.
            batch_train: batch size of those network updates.
        """

        feat_weight: float = 1.0
        dis_weight: float = 1.0
        temperature: float = 1.0
        outer_loop: int = 0
        inner_loop: int = 0
        lr_net: float = 0.01
        batch_train: int = 256

        def __post_init__(self):
            super().__post_init__()
            if self.temperature <= 0 or self.feat_weight < 0 or self.dis_weight < 0:
                raise DistillError("cafe needs batch_real >= 1, temperature > 0 and non-negative weights.")

    needs_real = True
    joint_classes = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.batch_real, self.temperature = c.batch_real, c.temperature
        self.feat_weight, self.dis_weight = c.feat_weight, c.dis_weight
        self.augmenter = SiameseAugmenter(c.aug, c.aug_options)
        self.source = c.net_source()
        self.schedule = NetSchedule(self.source, c.outer_loop, c.inner_loop, c.lr_net, self.augmenter, c.batch_train)
        self._logs: dict[str, float] = {}

    def terms(self, syn: Parametrization, ctx: Context, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(alignment, discrimination) for the classes of the unit under ``net``."""
        align = syn.render(slice(0, 1)).new_zeros(())
        real_emb, real_lab, centres = [], [], []
        for real, fr, fs in class_block_features(syn, ctx, net, self.norm, self.augmenter, self.batch_real):
            for a, b in zip(fr, fs):
                align = align + ((a.mean(0) - b.mean(0)) ** 2).sum()
            real_emb.append(fr[-1].flatten(1))
            real_lab.append(torch.full((real.shape[0],), len(centres), device=real.device))
            centres.append(fs[-1].flatten(1).mean(0))
        logits = torch.cat(real_emb) @ torch.stack(centres).t() / self.temperature
        dis = F.cross_entropy(logits, torch.cat(real_lab))
        return align, dis

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        net = self.schedule.network(syn, ctx, self.norm)
        for p in net.parameters():
            p.requires_grad_(False)
        align, dis = self.terms(syn, ctx, net)
        self._logs = {"align": float(align.detach()), "dis": float(dis.detach())}
        return self.feat_weight * align + self.dis_weight * dis

