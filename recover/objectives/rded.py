"""RDED (Sun et al., CVPR'24, "On the Diversity and Realism of Distilled Dataset"): select and stitch real crops.

No optimisation. Per class: take ``pool`` real images of the class (the same seeded order init-from-real and the
random baseline use), cut ``crops`` random-resized square crops of each at ``size / factor``, score every crop by
the teachers ("observers") with the cross-entropy of its class (low = realistic; several teachers average), keep
the best crop of each image, then the ``ipc x factor^2`` best crops of the class, and stitch ``factor x factor`` of
them into each synthetic image (crop rank ``r`` goes to image ``r mod ipc``, grid cell ``r div ipc``, so every image
gets one crop of every quality band). With ``factor = 1`` the image is the best crop itself, at full size.

Memory is bounded by ``batch`` crops plus the ``ipc x factor^2`` kept: the class's images are streamed in batches and
the kept set is merged after each batch. Randomness is drawn from a generator seeded by (seed, class), so the
images are a pure function of (seed, class, index) whatever the unit layout or the number of processes.

Soft labels are computed at relabel time (``distillset relabel``), as for every set: the teacher labels each stored
random crop of the stitched image, so crops that cover one region get that region's label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError
from distillset.core.partition import init_order, mix_seed
from distillset.recover.base import ComposingObjective, Context, register_objective
from distillset.squeeze.augment import affine_crop, sample_crops

log = logging.getLogger("distillset.recover")


def cell_bounds(size: int, factor: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each of the ``factor`` cells along a side of ``size`` pixels (the remainder goes to
    the first cells, one pixel each)."""
    base, extra = divmod(size, factor)
    out, start = [], 0
    for i in range(factor):
        n = base + (1 if i < extra else 0)
        out.append((start, n))
        start += n
    return out


def stitch(patches: torch.Tensor, ipc: int, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """``ipc`` images of ``size`` from ``ipc x factor^2`` patches sorted best first: patch ``r`` fills image
    ``r % ipc`` at grid cell ``r // ipc`` (row-major), resized to the cell."""
    n, c = patches.shape[:2]
    if n != ipc * factor * factor:
        raise ValueError(f"stitch needs {ipc * factor * factor} patches, got {n}")
    out = patches.new_zeros(ipc, c, *size)
    rows, cols = cell_bounds(size[0], factor), cell_bounds(size[1], factor)
    for cell in range(factor * factor):
        (y, h), (x, w) = rows[cell // factor], cols[cell % factor]
        block = patches[cell * ipc:(cell + 1) * ipc]
        if block.shape[-2:] != (h, w):
            block = F.interpolate(block, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[:, :, y:y + h, x:x + w] = block
    return out


@register_objective("rded", paper="Sun et al. 2024, On the Diversity and Realism of Distilled Dataset: An Efficient "
                    "Dataset Distillation Paradigm (CVPR)",
                    description="select the teacher-scored most realistic real crops, stitched factor x factor")
class RDED(ComposingObjective):
    """RDED: realistic and diverse crops of real images, scored by the teachers, stitched factor x factor."""

    @dataclass
    class Config:
        """RDED's options.

        Attributes:
            factor: crops per side of a synthetic image (1: one crop per image; 2: four, RDED's ImageNet default).
            crops: random-resized crops per real image, of which the most realistic is kept (RDED: 5).
            pool: real images of each class scored (RDED's ``mipc``: 300); the whole class when it is smaller.
            min_scale: lower bound of the crops' area fraction (torchvision's RandomResizedCrop: 0.08).
            max_scale: upper bound of the crops' area fraction.
            batch: crops scored per teacher forward (bounds memory).
        """

        factor: int = 1
        crops: int = 5
        pool: int = 300
        min_scale: float = 0.08
        max_scale: float = 1.0
        batch: int = 500

        def __post_init__(self):
            if self.factor < 1:
                raise DistillError(f"rded factor must be >= 1, got {self.factor}.")
            if self.crops < 1 or self.pool < 1 or self.batch < 1:
                raise DistillError("rded crops, pool and batch must be >= 1.")
            if not 0 < self.min_scale <= self.max_scale <= 1:
                raise DistillError(f"rded needs 0 < min_scale <= max_scale <= 1, got {self.min_scale}, "
                                   f"{self.max_scale}.")

    needs_teacher = True
    needs_real = True

    def __init__(self, cfg: Config | None = None):
        super().__init__(cfg)
        self.factor, self.crops, self.pool, self.batch = self.cfg.factor, self.cfg.crops, self.cfg.pool, self.cfg.batch
        self.scale = (float(self.cfg.min_scale), float(self.cfg.max_scale))

    def real_per_class(self, ipc: int) -> int:
        return ipc * self.factor ** 2  # every crop comes from a distinct real image

    def loss(self, syn, ctx: Context) -> torch.Tensor:
        raise DistillError("'rded' selects and stitches real crops; it has no loss to optimise.")

    def setup(self, ctx: Context) -> None:
        h, w = ctx.image_shape[-2:]
        if h % self.factor or w % self.factor:
            raise DistillError(f"rded factor {self.factor} does not divide the image size {h}x{w}; choose a factor "
                               "that divides it (1 or 2 for 32 px images).")

    @torch.no_grad()
    def score(self, x: torch.Tensor, c: int, ctx: Context) -> torch.Tensor:
        """Cross-entropy of class ``c`` for every image of ``x`` (``[0, 1]``), averaged over the teachers."""
        total = torch.zeros(x.shape[0], device=x.device)
        target = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        for t in ctx.teachers:
            with ctx.autocast():
                logits = t(x)
            total += F.cross_entropy(logits.float(), target, reduction="none")
        return total / len(ctx.teachers)

    def _patches(self, real: torch.Tensor, g: torch.Generator, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The best of ``crops`` random-resized crops of each image: ``(patches at size/factor, the full-size
        images the teacher scored)``. With ``factor > 1`` a patch is scored padded to full size with the data mean
        (zero in the teacher's normalised units), as RDED scores its small crops."""
        n, c, h, w = real.shape
        k = self.crops
        p = sample_crops(n * k, g, self.scale, ratio=(1.0, 1.0), flip=False)
        reps = real.repeat_interleave(k, 0)
        dev = real.device
        full = affine_crop(reps, p["cx"].to(dev), p["cy"].to(dev), p["w"].to(dev), p["h"].to(dev))
        if self.factor == 1:
            small = scored = full
        else:
            small = F.interpolate(full, size=(h // self.factor, w // self.factor), mode="bilinear",
                                  align_corners=False, antialias=True)
            mean = torch.tensor(ctx.mean, device=dev).view(1, -1, 1, 1)
            scored = mean.expand(n * k, c, h, w).clone()
            top, left = (h - small.shape[-2]) // 2, (w - small.shape[-1]) // 2
            scored[:, :, top:top + small.shape[-2], left:left + small.shape[-1]] = small
        return small, scored

    def compose(self, c: int, ipc: int, ctx: Context) -> torch.Tensor:
        """All ``ipc`` stitched images of class ``c`` (``[0, 1]`` floats)."""
        need = ipc * self.factor ** 2
        order = init_order(ctx.real.index[c], c, ctx.seed)[: self.pool]
        if order.numel() < need:
            raise DistillError(f"rded needs ipc x factor^2 = {need} real images of class {c} but it has "
                               f"{order.numel()} (pool {self.pool}); lower ipc or factor, or raise pool.")
        g = torch.Generator().manual_seed(mix_seed(ctx.seed, 29, c))
        kept_x: torch.Tensor | None = None
        kept_s: torch.Tensor | None = None
        per = max(1, self.batch // self.crops)
        for s in range(0, order.numel(), per):
            real = ctx.real.get(order[s:s + per])
            small, scored = self._patches(real, g, ctx)
            ce = self.score(scored, c, ctx).view(-1, self.crops)
            best = ce.argmin(1)
            rows = torch.arange(ce.shape[0], device=ce.device)
            ce = ce[rows, best]
            small = small.view(-1, self.crops, *small.shape[1:])[rows, best]
            xs = small if kept_x is None else torch.cat([kept_x, small])
            ss = ce if kept_s is None else torch.cat([kept_s, ce])
            top = torch.argsort(ss, stable=True)[:need]  # stable: ties keep stream order, deterministic
            kept_x, kept_s = xs[top], ss[top]
        images = stitch(kept_x, ipc, self.factor, tuple(ctx.image_shape[-2:])).clamp_(0, 1)
        return images
