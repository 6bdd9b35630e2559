"""Differentiable augmentations of the recover engine: the CDA curriculum RandomResizedCrop (+ flip)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distillset.core.errors import DistillError
from distillset.core.schedule import cosine_ramp
from distillset.recover.base import Augmentation, Context, register_augmentation
from distillset.squeeze.augment import affine_crop, sample_crops  # noqa: F401  (re-exported)


def curriculum_min_scale(progress: float, final: float, milestone: float, schedule: str, steps: int = 4) -> float:
    """Lower bound of the crop area at ``progress`` in [0, 1]: from 1.0 down to ``final`` by ``milestone``.

    ``milestone = 0`` disables the curriculum (SRe2L's fixed ``(final, 1)`` range from the start).
    """
    if milestone <= 0 or progress >= milestone:
        return final
    t = progress / milestone
    if schedule == "linear":
        f = t
    elif schedule == "cosine":
        f = cosine_ramp(t)
    elif schedule == "step":
        f = math.floor(t * steps) / steps
    else:
        raise DistillError(f"unknown curriculum schedule '{schedule}'; use step, linear or cosine.")
    return 1.0 - (1.0 - final) * f


@register_augmentation("curriculum_crop", paper="Yin & Shen 2024, Dataset Distillation via Curriculum Data "
                       "Synthesis in Large Data Era (CDA, arXiv:2311.18838)")
class CurriculumCrop(Augmentation):
    """RandomResizedCrop whose lower area bound follows the CDA curriculum, plus horizontal flip."""

    @dataclass
    class Config:
        """Options of the curriculum crop.

        Attributes:
            final_scale: the lower area bound at the end of the curriculum (0.08 as in SRe2L/CDA).
            milestone: fraction of the iterations over which the bound falls from 1.0 to ``final_scale``
                (0 = no curriculum, SRe2L).
            schedule: ``step``, ``linear`` or ``cosine``.
            flip: random horizontal flips.
        """

        final_scale: float = 0.08
        milestone: float = 0.5
        schedule: str = "cosine"
        flip: bool = True

        def __post_init__(self):
            if not 0 < self.final_scale <= 1:
                raise DistillError(f"final_scale must be in (0, 1], got {self.final_scale}.")
            if not 0 <= self.milestone <= 1:
                raise DistillError(f"milestone is a fraction of the iterations in [0, 1], got {self.milestone}.")
            curriculum_min_scale(0.0, self.final_scale, self.milestone, self.schedule)  # validates the schedule name

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        c = self.cfg
        self.final_scale, self.milestone, self.schedule, self.flip = c.final_scale, c.milestone, c.schedule, c.flip

    def min_scale(self, ctx: Context) -> float:
        return curriculum_min_scale(ctx.progress, self.final_scale, self.milestone, self.schedule)

    def sample(self, n: int, ctx: Context) -> dict[str, torch.Tensor]:
        p = sample_crops(n, ctx.generator, (self.min_scale(ctx), 1.0), flip=self.flip)
        return {k: v.to(ctx.device, non_blocking=True) for k, v in p.items()}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        p = {k: (v.to(x.dtype) if v.is_floating_point() else v) for k, v in params.items()}
        return affine_crop(x, p["cx"], p["cy"], p["w"], p["h"], p["flip"])


@register_augmentation("none")
class NoAugmentation(Augmentation):
    """Identity (for methods or ablations without augmentation)."""
