"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) and DiffAugment (Zhao et al. 2020).

Every op is differentiable in the images and takes its random numbers from a parameter dict drawn beforehand, so the
same draw can be applied to a real and a synthetic batch (the *Siamese* part of DSA): gradients and embeddings of the
two batches are then compared under the same transformation.

DSA (``strategy="color_crop_cutout_flip_scale_rotate"``) samples ONE op family per call (``color`` applies
brightness, saturation and contrast together) with the DC/DSA ratios: scale 1.2, rotate 15 deg, crop (translation)
0.125, cutout 0.5, flip 0.5, brightness 1.0, saturation 2.0, contrast 0.5. In Siamese mode one draw is shared by the
whole batch (as DSA's matching code does), so the parameters fit batches of any size. DiffAugment applies all of
``color``, ``translation`` and ``cutout`` with per-sample draws.

:func:`dsa_augment` is the same thing as a plain function for student training and expert trajectories. The
registered recover plugins ``dsa`` and ``diffaugment`` (:mod:`distillset.recover.augmentations.dsa`) wrap
:class:`SiameseAug`; the ops live here, below every stage that uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillset.core.errors import DistillError

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DIFFAUGMENT_STRATEGY = "color_translation_cutout"
FAMILIES = ("color", "crop", "translation", "cutout", "flip", "scale", "rotate")


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g)


def sample_family(family: str, n: int, generator: torch.Generator, size: tuple[int, int], ratios: dict) -> dict:
    """Random numbers for one op family, ``n`` draws (CPU tensors), keys prefixed by the family."""
    h, w = size
    if family == "color":
        return {"brightness": (_rand(n, generator) - 0.5) * ratios["brightness"],
                "saturation": _rand(n, generator) * ratios["saturation"],
                "contrast": _rand(n, generator) + ratios["contrast"]}
    if family in ("crop", "translation"):
        # integer shifts in [-s, s] pixels, as DSA's rand_crop / DiffAugment's translation
        sx, sy = int(h * ratios["crop"] + 0.5), int(w * ratios["crop"] + 0.5)
        return {"shift_x": torch.randint(-sx, sx + 1, (n,), generator=generator),
                "shift_y": torch.randint(-sy, sy + 1, (n,), generator=generator)}
    if family == "cutout":
        ch, cw = int(h * ratios["cutout"] + 0.5), int(w * ratios["cutout"] + 0.5)
        return {"cut_x": torch.randint(0, h + (1 - ch % 2), (n,), generator=generator),
                "cut_y": torch.randint(0, w + (1 - cw % 2), (n,), generator=generator)}
    if family == "flip":
        return {"flip": _rand(n, generator) < ratios["flip"]}
    if family == "scale":
        r = ratios["scale"]
        return {"scale_x": _rand(n, generator) * (r - 1.0 / r) + 1.0 / r,
                "scale_y": _rand(n, generator) * (r - 1.0 / r) + 1.0 / r}
    if family == "rotate":
        return {"angle": (_rand(n, generator) - 0.5) * 2 * ratios["rotate"] / 180 * math.pi}
    raise DistillError(f"unknown DSA op '{family}'; use some of {', '.join(FAMILIES)} joined by '_'.")


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a (1,) or (N,) parameter to the batch of ``x`` as (N, 1, 1, 1)."""
    v = v.to(x.device)
    if v.is_floating_point():
        v = v.to(x.dtype)
    if v.shape[0] == 1:
        v = v.expand(x.shape[0])
    elif v.shape[0] != x.shape[0]:
        raise DistillError(f"augmentation parameters were drawn for {v.shape[0]} images but the batch has "
                           f"{x.shape[0]}; draw them for this batch or in Siamese mode (one draw for all).")
    return v.view(-1, 1, 1, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _translate(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Integer shift with zero fill (the one-pixel zero pad of DSA's rand_crop, clamped), differentiable in x."""
    n, _, h, w = x.shape
    sx, sy = _per_sample(sx, x).view(n, 1, 1), _per_sample(sy, x).view(n, 1, 1)
    gi = torch.arange(h, device=x.device).view(1, h, 1)
    gj = torch.arange(w, device=x.device).view(1, 1, w)
    ii = (gi + sx + 1).clamp(0, h + 1).expand(n, h, w)
    jj = (gj + sy + 1).clamp(0, w + 1).expand(n, h, w)
    xp = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    b = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return xp[b, ii, jj].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cx, cy = _per_sample(cx, x).view(n, 1, 1), _per_sample(cy, x).view(n, 1, 1)
    gi = torch.arange(h, device=x.device).view(1, h, 1)
    gj = torch.arange(w, device=x.device).view(1, 1, w)
    # rows/cols [c - size//2, c - size//2 + size) clamped to the image, as DSA's rand_cutout
    lo_i, lo_j = (cx - ch // 2).clamp(0, h - 1), (cy - cw // 2).clamp(0, w - 1)
    hi_i, hi_j = (cx - ch // 2 + ch - 1).clamp(0, h - 1), (cy - cw // 2 + cw - 1).clamp(0, w - 1)
    hole = (gi >= lo_i) & (gi <= hi_i) & (gj >= lo_j) & (gj <= hi_j)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def apply_family(x: torch.Tensor, family: str, p: dict, ratios: dict) -> torch.Tensor:
    """Apply one op family with drawn parameters ``p`` (keys from :func:`sample_family`)."""
    n = x.shape[0]
    if family == "color":
        x = x + _per_sample(p["brightness"], x)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * _per_sample(p["saturation"], x) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * _per_sample(p["contrast"], x) + m
    if family in ("crop", "translation"):
        return _translate(x, p["shift_x"], p["shift_y"])
    if family == "cutout":
        return _cutout(x, p["cut_x"], p["cut_y"], ratios["cutout"])
    if family == "flip":
        f = _per_sample(p["flip"], x)
        return torch.where(f, x.flip(3), x)
    if family == "scale":
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = _per_sample(p["scale_x"], x).view(n)
        theta[:, 1, 1] = _per_sample(p["scale_y"], x).view(n)
        return _affine(x, theta)
    if family == "rotate":
        a = _per_sample(p["angle"], x).view(n)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(-a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
        return _affine(x, theta)
    raise DistillError(f"unknown DSA op '{family}'.")


DSA_RATIOS = {"scale": 1.2, "rotate": 15.0, "crop": 0.125, "cutout": 0.5, "flip": 0.5, "brightness": 1.0,
              "saturation": 2.0, "contrast": 0.5}


def parse_strategy(strategy: str) -> list[str]:
    ops = [s for s in strategy.split("_") if s]
    bad = [s for s in ops if s not in FAMILIES]
    if bad or not ops:
        raise DistillError(f"unknown augmentation strategy '{strategy}'; join some of {', '.join(FAMILIES)} "
                           "with '_' (e.g. color_crop_cutout_flip_scale_rotate).")
    return ops


def family_params(params: dict, i: int) -> dict:
    """The draws of op family ``i`` in a :meth:`SiameseAug.sample` result, without their ``"{i}."`` prefix."""
    prefix = f"{i}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


class SiameseAug:
    """Draw/apply logic shared by the registered augmentations and :func:`dsa_augment` (no recover Context needed)."""

    def __init__(self, strategy: str, one_op: bool, siamese: bool, ratios: dict | None = None):
        self.ops = parse_strategy(strategy)
        self.one_op, self.siamese = one_op, siamese
        self.ratios = {**DSA_RATIOS, **(ratios or {})}

    def sample(self, n: int, generator: torch.Generator, size: tuple[int, int]) -> dict:
        """Parameters for a batch of ``n`` (one shared draw in Siamese mode). ``ops`` lists the op indices."""
        k = 1 if self.siamese else n
        if self.one_op:
            chosen = [int(torch.randint(len(self.ops), (1,), generator=generator))]
        else:
            chosen = list(range(len(self.ops)))
        params: dict = {"ops": torch.tensor(chosen, dtype=torch.long)}
        for i in chosen:
            for key, v in sample_family(self.ops[i], k, generator, size, self.ratios).items():
                params[f"{i}.{key}"] = v
        return params

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        for i in params["ops"].tolist():
            x = apply_family(x, self.ops[i], family_params(params, i), self.ratios)
        return x


def dsa_augment(x: torch.Tensor, generator: torch.Generator, strategy: str = DSA_STRATEGY, one_op: bool = True,
                siamese: bool = False) -> torch.Tensor:
    """DSA on a batch without a Context (student training): one op family drawn per call, per-sample parameters.

    Args:
        x: images ``(N, C, H, W)`` (any range: the colour ops are affine, as in DSA).
        generator: CPU generator all random numbers come from.
        strategy: op families joined by ``_``.
        one_op: sample one family per call (DSA) or apply them all (DiffAugment).
        siamese: one draw for the whole batch.
    """
    aug = SiameseAug(strategy, one_op, siamese)
    return aug.apply(x, aug.sample(x.shape[0], generator, tuple(x.shape[-2:])))
