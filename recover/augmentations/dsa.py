"""The recover plugins ``dsa`` (Differentiable Siamese Augmentation, Zhao & Bilen 2021) and ``diffaugment`` (Zhao et
al. 2020): thin wrappers of :class:`distillset.squeeze.dsa.SiameseAug`, which holds the differentiable ops shared
with student training and expert trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillset.recover.base import Augmentation, Context, register_augmentation
from distillset.squeeze.dsa import (  # noqa: F401  (re-exported: the DSA names recover users know)
    DIFFAUGMENT_STRATEGY,
    DSA_RATIOS,
    DSA_STRATEGY,
    FAMILIES,
    SiameseAug,
    apply_family,
    dsa_augment,
    parse_strategy,
    sample_family,
)


@dataclass
class DSAConfig:
    """Options of the DSA-family augmentations.

    Attributes:
        strategy: op families joined by ``_`` (unset = the augmentation's default: color_crop_cutout_flip_scale_rotate
            for dsa, color_translation_cutout for diffaugment).
        one_op: sample one family per step (DSA) or apply them all (DiffAugment); unset = the augmentation's default.
        siamese: one draw for the whole batch, or per-image draws; unset = the augmentation's default.
        scale: DSA's scale ratio.
        rotate: maximum rotation in degrees.
        crop: translation as a fraction of the image size.
        cutout: cutout size as a fraction of the image size.
        flip: flip probability.
        brightness: brightness ratio.
        saturation: saturation ratio.
        contrast: contrast ratio.
    """

    strategy: str | None = None
    one_op: bool | None = None
    siamese: bool | None = None
    scale: float = DSA_RATIOS["scale"]
    rotate: float = DSA_RATIOS["rotate"]
    crop: float = DSA_RATIOS["crop"]
    cutout: float = DSA_RATIOS["cutout"]
    flip: float = DSA_RATIOS["flip"]
    brightness: float = DSA_RATIOS["brightness"]
    saturation: float = DSA_RATIOS["saturation"]
    contrast: float = DSA_RATIOS["contrast"]

    def __post_init__(self):
        if self.strategy:
            parse_strategy(self.strategy)


class _Registered(Augmentation):
    Config = DSAConfig
    default_strategy = DSA_STRATEGY
    default_one_op = True
    default_siamese = True

    def __init__(self, cfg: DSAConfig | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.impl = SiameseAug(c.strategy or self.default_strategy,
                               self.default_one_op if c.one_op is None else c.one_op,
                               self.default_siamese if c.siamese is None else c.siamese,
                               {k: float(getattr(c, k)) for k in DSA_RATIOS})

    def sample(self, n: int, ctx: Context) -> dict[str, torch.Tensor]:
        h, w = ctx.image_shape[-2:]
        return self.impl.sample(n, ctx.generator, (h, w))

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], ctx: Context | None = None) -> torch.Tensor:
        return self.impl.apply(x, params)


@register_augmentation("dsa", paper="Zhao & Bilen 2021, Dataset Condensation with Differentiable Siamese "
                       "Augmentation (arXiv:2102.08259)")
class DSA(_Registered):
    """Differentiable Siamese Augmentation: one op family per step, one draw shared by real and synthetic batches.

    Options: :class:`DSAConfig` (defaults: DSA's strategy and ratios, one_op and siamese true).
    """


@register_augmentation("diffaugment", paper="Zhao et al. 2020, Differentiable Augmentation for Data-Efficient GAN "
                       "Training (arXiv:2006.10738)")
class DiffAugment(_Registered):
    """DiffAugment: colour, translation (0.125) and cutout (0.5), all applied, per-image draws.

    Options: as ``dsa`` (defaults: strategy color_translation_cutout, one_op False, siamese False).
    """

    default_strategy = DIFFAUGMENT_STRATEGY
    default_one_op = False
    default_siamese = False
