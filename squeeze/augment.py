"""Batched, differentiable crop/flip geometry shared by training, recover and relabel (one implementation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
