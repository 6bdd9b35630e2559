"""Differentiable augmentations of the recover engine: the CDA curriculum RandomResizedCrop (+ flip)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from launch.errors import DistillError
from recover.base import Augmentation, Context, register_augmentation


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
        f = 0.5 * (1 - math.cos(math.pi * t))
    elif schedule == "step":
        f = math.floor(t * steps) / steps
    else:
        raise DistillError(f"unknown curriculum schedule '{schedule}'; use step, linear or cosine.")
    return 1.0 - (1.0 - final) * f


def affine_crop(x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, w: torch.Tensor, h: torch.Tensor,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes (centres/sizes in [-1, 1] units, per sample) resized back to the input size, differentiably."""
    n = x.shape[0]
    sx = w * (1 - 2 * flip.to(w.dtype)) if flip is not None else w
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def sample_crops(n: int, generator: torch.Generator, scale: tuple[float, float], ratio=(3 / 4, 4 / 3),
                 flip: bool = True) -> dict[str, torch.Tensor]:
    """RandomResizedCrop parameters for ``n`` images on CPU: centre, half-size fractions and a flip bit."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    fl = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return {"cx": cx, "cy": cy, "w": w, "h": h, "flip": fl}


@register_augmentation("curriculum_crop")
class CurriculumCrop(Augmentation):
    """RandomResizedCrop whose lower area bound follows the CDA curriculum, plus horizontal flip.

    Options:
        final_scale: the lower area bound at the end of the curriculum (0.08 as in SRe2L/CDA).
        milestone: fraction of the iterations over which the bound falls from 1.0 to ``final_scale``
            (0 = no curriculum, SRe2L).
        schedule: ``step``, ``linear`` or ``cosine``.
        flip: random horizontal flips.
    """

    def __init__(self, final_scale: float = 0.08, milestone: float = 0.5, schedule: str = "cosine",
                 flip: bool = True):
        if not 0 < final_scale <= 1:
            raise DistillError(f"final_scale must be in (0, 1], got {final_scale}.")
        if not 0 <= milestone <= 1:
            raise DistillError(f"milestone is a fraction of the iterations in [0, 1], got {milestone}.")
        curriculum_min_scale(0.0, final_scale, milestone, schedule)  # validates the schedule name
        self.final_scale, self.milestone, self.schedule, self.flip = final_scale, milestone, schedule, flip

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
