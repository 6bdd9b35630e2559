"""DataDAM: dataset distillation with attention matching (Sajedi et al. 2023).

For every class, a randomly initialised ConvNet's blocks give feature maps of a real batch and of the synthetic
images (same DSA draw). Each block's spatial attention map is ``sum_channels |f|^p`` (p = 4), flattened and
L2-normalised per image; the spatial attention matching (SAM) loss is the squared distance between the mean real and
mean synthetic maps, summed over the blocks before the last. The last block's embedding is matched by a linear-kernel
MMD (squared distance of the means), weighted by ``lambda_mmd``. No inner loop, classes independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.recover.base import Context, Objective, Parametrization, register_objective
from distillset.recover.objectives._matching import MatchingConfig, Normalize, SiameseAugmenter, class_block_features


def attention_map(f: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    """``(N, C, H, W)`` features -> ``(N, H*W)`` L2-normalised spatial attention ``sum_c |f_c|^power``."""
    a = f.abs().pow(power).sum(1).flatten(1)
    return F.normalize(a, dim=1)


@register_objective("datadam", paper="Sajedi et al. 2023, DataDAM: Efficient Dataset Distillation with Attention "
                    "Matching (arXiv:2310.00093)")
class AttentionMatching(Objective):
    """DataDAM: per-class spatial attention matching on every block + MMD on the last embedding, random networks."""

    @dataclass
    class Config(MatchingConfig):
        """Options of DataDAM (besides the matching ones: batch_real, aug, networks as ``dm``).

        Attributes:
            power: exponent of the attention map.
            lambda_mmd: weight of the last-layer MMD term.
        """

        power: float = 4.0
        lambda_mmd: float = 0.01

        def __post_init__(self):
            super().__post_init__()
            if self.power <= 0 or self.lambda_mmd < 0:
                raise DistillError("datadam needs batch_real >= 1, power > 0 and lambda_mmd >= 0.")

    needs_real = True
    joint_classes = False

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.batch_real, self.power, self.lambda_mmd = c.batch_real, c.power, c.lambda_mmd
        self.augmenter = SiameseAugmenter(c.aug, c.aug_options)
        self.source = c.net_source()
        self._logs: dict[str, float] = {}

    def setup(self, ctx: Context) -> None:
        self.norm = Normalize(ctx).to(ctx.device)

    def terms(self, syn: Parametrization, ctx: Context, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(SAM, MMD) summed over the classes of the unit under ``net``."""
        sam = mmd = None
        for _, fr, fs in class_block_features(syn, ctx, net, self.norm, self.augmenter, self.batch_real):
            s = sum(((attention_map(a, self.power).mean(0) - attention_map(b, self.power).mean(0)) ** 2).sum()
                    for a, b in zip(fr[:-1], fs[:-1])) + fs[-1].new_zeros(())
            m = ((fr[-1].flatten(1).mean(0) - fs[-1].flatten(1).mean(0)) ** 2).sum()
            sam = s if sam is None else sam + s
            mmd = m if mmd is None else mmd + m
        return sam, mmd

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        net = self.source.sample(ctx)
        for p in net.parameters():
            p.requires_grad_(False)
        sam, mmd = self.terms(syn, ctx, net)
        self._logs = {"sam": float(sam.detach()), "mmd": float(mmd.detach())}
        return sam + self.lambda_mmd * mmd

    def logs(self) -> dict[str, float]:
        return dict(self._logs)
