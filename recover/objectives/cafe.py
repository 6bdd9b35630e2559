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

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Parametrization, register_objective
from distillset.recover.objectives._matching import (
    NetSchedule,
    ScheduledNetObjective,
    SiameseAugmenter,
    class_block_features,
)
from distillset.recover.objectives.model_aug import NetSource


@register_objective("cafe")
class FeatureAlignment(ScheduledNetObjective):
    """CAFE: layer-wise feature alignment + discrimination loss with synthetic class means as the classifier.

    Options:
        batch_real: real images per class per step (256).
        feat_weight, dis_weight: weights of the two terms (1.0, 1.0).
        temperature: divides the discrimination logits (embedding dot products are large on random networks).
        outer_loop, inner_loop, lr_net, batch_train: the network schedule (0 = DC's per-ipc loops).
        aug: Siamese augmentation: dsa (default), diffaugment, none, or engine.
        arch, width, model_pool, perturb, pool_epochs, pool_lr: networks (see ``dc``).
    """

    needs_real = True
    joint_classes = True

    def __init__(self, batch_real: int = 256, feat_weight: float = 1.0, dis_weight: float = 1.0,
                 temperature: float = 1.0, outer_loop: int = 0, inner_loop: int = 0, lr_net: float = 0.01,
                 batch_train: int = 256, aug: str = "dsa", aug_options: dict | None = None, arch: str = "convnet",
                 width: int = 128, model_pool: int | str = 0, perturb: float = 0.0, pool_epochs: float = 2.0,
                 pool_lr: float = 0.01):
        if batch_real < 1 or temperature <= 0 or feat_weight < 0 or dis_weight < 0:
            raise DistillError("cafe needs batch_real >= 1, temperature > 0 and non-negative weights.")
        self.batch_real, self.temperature = batch_real, temperature
        self.feat_weight, self.dis_weight = feat_weight, dis_weight
        self.augmenter = SiameseAugmenter(aug, aug_options)
        self.source = NetSource(arch, width, model_pool, perturb, pool_epochs, pool_lr)
        self.schedule = NetSchedule(self.source, outer_loop, inner_loop, lr_net, self.augmenter, batch_train)
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

