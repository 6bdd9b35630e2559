"""The recover plugins ``dsa`` (Differentiable Siamese Augmentation, Zhao & Bilen 2021) and ``diffaugment`` (Zhao et
al. 2020): thin wrappers of :class:`distillset.squeeze.dsa.SiameseAug`, which holds the differentiable ops shared
with student training and expert trajectories.
"""

from __future__ import annotations

import torch

from distillset.core.errors import DistillError
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


class _Registered(Augmentation):
    default_strategy = DSA_STRATEGY
    default_one_op = True
    default_siamese = True

    def __init__(self, strategy: str | None = None, one_op: bool | None = None, siamese: bool | None = None,
                 **ratios: float):
        bad = sorted(set(ratios) - set(DSA_RATIOS))
        if bad:
            raise DistillError(f"augmentation '{self.name}' has no option {bad}; options: strategy, one_op, siamese, "
                               f"{', '.join(DSA_RATIOS)}.")
        self.impl = SiameseAug(strategy or self.default_strategy,
                               self.default_one_op if one_op is None else one_op,
                               self.default_siamese if siamese is None else siamese,
                               {k: float(v) for k, v in ratios.items()})

    def sample(self, n: int, ctx: Context) -> dict[str, torch.Tensor]:
        h, w = ctx.image_shape[-2:]
        return self.impl.sample(n, ctx.generator, (h, w))

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], ctx: Context | None = None) -> torch.Tensor:
        return self.impl.apply(x, params)


@register_augmentation("dsa")
class DSA(_Registered):
    """Differentiable Siamese Augmentation: one op family per step, one draw shared by real and synthetic batches.

    Options:
        strategy: op families joined by ``_`` (default color_crop_cutout_flip_scale_rotate).
        one_op: sample one family per step (True, DSA) or apply all.
        siamese: one draw for the whole batch (True) or per-image draws.
        scale, rotate, crop, cutout, flip, brightness, saturation, contrast: the ops' ratios (DSA's defaults).
    """


@register_augmentation("diffaugment")
class DiffAugment(_Registered):
    """DiffAugment: colour, translation (0.125) and cutout (0.5), all applied, per-image draws.

    Options: as ``dsa`` (defaults: strategy color_translation_cutout, one_op False, siamese False).
    """

    default_strategy = DIFFAUGMENT_STRATEGY
    default_one_op = False
    default_siamese = False
