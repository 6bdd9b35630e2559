"""Backdoor triggers as pure functions on uint8 images (Liu et al., NDSS'23, "Backdoor Attacks Against Dataset
Distillation"): a square patch (size, corner), its initial pattern, stamping it on images, choosing the images to
poison and relabelling them to the target class.

Stamping works on the uint8 images every stage holds (``ImageSet``), so a poisoned data source, the recover
engine's real data (DOORPING re-stamps it as the trigger changes) and the triggered test split used for the attack
success rate all carry the very same pixels. A trigger is ``(pattern, mask)``: ``pattern`` uint8 ``(C, H, W)``
(its values matter only under the mask), ``mask`` bool ``(H, W)``.
"""

from __future__ import annotations

import torch

from distillset.core.data import ImageSet
from distillset.core.errors import DistillError

LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left")
PATTERNS = ("white", "random")


def patch_mask(image_shape: tuple[int, int, int], size: int, location: str = "bottom_right",
               margin: int = 1) -> torch.Tensor:
    """The bool ``(H, W)`` mask of a ``size`` x ``size`` patch ``margin`` pixels from the corner ``location``.

    The paper's code stamps a square one pixel in from the bottom-right corner (rows/columns ``H-size-1 .. H-2``);
    ``margin`` keeps that off-by-one so crops and flips of the border do not erase it entirely.
    """
    _, h, w = image_shape
    if location not in LOCATIONS:
        raise DistillError(f"unknown trigger location '{location}'; use one of {', '.join(LOCATIONS)}.")
    if size < 1:
        raise DistillError(f"trigger size must be >= 1 pixel, got {size}.")
    if margin < 0:
        raise DistillError(f"trigger margin must be >= 0, got {margin}.")
    if size + margin > min(h, w):
        raise DistillError(f"a {size}x{size} trigger {margin} px from the corner does not fit {h}x{w} images; use "
                           f"--trigger-size {max(1, min(h, w) - margin)} or less.")
    top = h - margin - size if location.startswith("bottom") else margin
    left = w - margin - size if location.endswith("right") else margin
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    return mask


def initial_pattern(image_shape: tuple[int, int, int], mask: torch.Tensor, kind: str = "white",
                    seed: int = 0) -> torch.Tensor:
    """The trigger's starting pixels, uint8 ``(C, H, W)``, zero off the mask: ``white`` (255, BadNets and the
    paper's NAIVEATTACK) or ``random`` (uniform 1..255 from ``seed``, the paper's DOORPING start)."""
    c, h, w = image_shape
    if kind not in PATTERNS:
        raise DistillError(f"unknown trigger pattern '{kind}'; use one of {', '.join(PATTERNS)}.")
    if kind == "white":
        pattern = torch.full((c, h, w), 255, dtype=torch.uint8)
    else:
        g = torch.Generator().manual_seed(int(seed))
        pattern = torch.randint(1, 256, (c, h, w), generator=g).to(torch.uint8)
    return torch.where(mask, pattern, torch.zeros_like(pattern))


def stamp(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8 ``(N, C, H, W)``) with the masked pixels replaced by ``pattern``; a new tensor, every
    unmasked pixel untouched."""
    if images.dtype != torch.uint8 or pattern.dtype != torch.uint8:
        raise DistillError("triggers are stamped on uint8 images with a uint8 pattern.")
    if tuple(images.shape[1:]) != tuple(pattern.shape) or tuple(mask.shape) != tuple(images.shape[-2:]):
        raise DistillError(f"a trigger of shape {tuple(pattern.shape)} cannot be stamped on images of shape "
                           f"{tuple(images.shape[1:])}; build the trigger for this image size.")
    return torch.where(mask.to(images.device), pattern.to(images.device), images)


def poison_count(n: int, rate: float) -> int:
    """Images a poison ``rate`` turns into poisoned ones among ``n`` training images: ``round(rate * n)``."""
    return round(rate * n)


def choose_poisoned(labels: torch.Tensor, target: int, rate: float, seed: int) -> torch.Tensor:
    """Sorted indices of the ``round(rate * len(labels))`` images to poison, drawn by ``seed`` among the images whose
    class is not ``target`` (relabelling a target image would change nothing)."""
    pool = torch.nonzero(labels != target).flatten()
    k = poison_count(len(labels), rate)
    if k > len(pool):
        raise DistillError(f"poison rate {rate} asks for {k} poisoned images but only {len(pool)} are outside the "
                           f"target class; lower the poison rate.")
    g = torch.Generator().manual_seed(int(seed))
    return pool[torch.randperm(len(pool), generator=g)[:k]].sort().values


def check_target(target: int, num_classes: int) -> None:
    if not 0 <= target < num_classes:
        raise DistillError(f"target class {target} is out of range for {num_classes} classes; use 0.."
                           f"{num_classes - 1}.")


def poison(train: ImageSet, index: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor,
           target: int) -> ImageSet:
    """A copy of ``train`` whose images at ``index`` carry the trigger and the label ``target``."""
    check_target(target, train.num_classes)
    images, labels = train.images.clone(), train.labels.clone()
    images[index] = stamp(images[index], pattern, mask)
    labels[index] = target
    return ImageSet(images, labels, train.class_names)


def triggered(test: ImageSet, pattern: torch.Tensor, mask: torch.Tensor, target: int) -> ImageSet:
    """The test images not of class ``target`` with the trigger stamped, all labelled ``target``: a model's top-1
    on this set is the attack success rate (ASR)."""
    check_target(target, test.num_classes)
    keep = torch.nonzero(test.labels != target).flatten()
    return ImageSet(stamp(test.images[keep], pattern, mask), torch.full((len(keep),), target, dtype=torch.long),
                    test.class_names)


def pattern_to_uint8(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A float ``[0, 1]`` ``(C, H, W)`` trigger rounded to the uint8 pattern the images can hold (zero off the
    mask)."""
    u8 = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return torch.where(mask.cpu(), u8, torch.zeros_like(u8))
