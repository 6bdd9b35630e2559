"""What a network sees for an image: ``(x - mean) / std``, optionally followed by ZCA whitening.

Every loop that trains or scores a network on ``[0, 1]`` images (squeeze, expert trajectories, the matching
objectives, students, evaluation) builds one :class:`InputTransform`, so the normalisation is defined once.

ZCA whitening is what KIP and MTT use for CIFAR (regularisation 0.1 added to the covariance eigenvalues, as kornia's
``ZCAWhitening(eps=0.1)`` in MTT's code, fitted on mean/std-normalised training images). It is fitted once on real
training images, saved next to the expert buffers and the distilled set as safetensors, and applied again when
evaluating, so experts, synthetic images, students and test images all live in one space; ``inverse`` maps whitened
images back for viewing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.io import load_tensors, save_tensors


def whiten(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(flatten(x) - mean) @ w``, back in ``x``'s shape (the ZCA map; ``w`` is symmetric)."""
    return ((x.flatten(1) - mean.to(x)) @ w.to(x)).view(x.shape)


def unwhiten(u: torch.Tensor, mean: torch.Tensor, w_inv: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`whiten`: ``flatten(u) @ w_inv + mean``."""
    return (u.flatten(1) @ w_inv.to(u) + mean.to(u)).view(u.shape)


def check_shape(fitted: tuple[int, int, int], x: torch.Tensor) -> None:
    if tuple(x.shape[1:]) != tuple(fitted):
        raise DistillError(f"ZCA was fitted on images {tuple(fitted)} but got {tuple(x.shape[1:])}; fit it on the "
                           "same resolution.")


MAX_ZCA_DIM = 3 * 64 * 64
ZCA_FILE = "zca.safetensors"  # its name beside expert buffers and in a distilled-set folder


@dataclass
class ZCA:
    """``whiten(x) = (flatten(x) - mean) @ W``, ``W = U diag(1 / sqrt(S + reg)) U^T`` from the data covariance."""

    mean: torch.Tensor  # (D,)
    transform: torch.Tensor  # (D, D)
    inverse_transform: torch.Tensor  # (D, D)
    shape: tuple[int, int, int]
    reg: float

    @classmethod
    def fit(cls, images: torch.Tensor, reg: float = 0.1, transform=None, batch: int = 2048) -> ZCA:
        """Fit on ``(N, C, H, W)`` images: float images as evaluation will feed them in, or uint8 images with
        ``transform`` (e.g. an :class:`InputTransform` without ZCA) applied batch by batch, so a large training set is
        never held as float64 at once."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise DistillError("ZCA.fit needs a batch of at least 2 images (N, C, H, W).")
        if reg <= 0:
            raise DistillError(f"ZCA regularisation must be > 0, got {reg}.")
        d = images[0].numel()
        if d > MAX_ZCA_DIM:
            raise DistillError(f"ZCA of {tuple(images.shape[1:])} images needs a {d} x {d} covariance; it is meant "
                               f"for small images (CIFAR 32 px: 3,072 dims; limit {MAX_ZCA_DIM}). Resize with "
                               "image_size or drop zca.")
        total = torch.zeros(d, dtype=torch.float64)
        gram = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, len(images), batch):
            x = images[i:i + batch].cpu()
            x = x.float() / 255 if x.dtype == torch.uint8 else x.detach().float()
            if transform is not None:
                x = transform(x)
            x = x.double().flatten(1)
            total += x.sum(0)
            gram += x.t() @ x
        n = len(images)
        mean = total / n
        cov = gram / n - torch.outer(mean, mean)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp(min=0)
        w = (u * (s + reg).rsqrt()) @ u.t()
        winv = (u * (s + reg).sqrt()) @ u.t()
        return cls(mean.float(), w.float(), winv.float(), tuple(images.shape[1:]), float(reg))

    def same_as(self, other: ZCA) -> bool:
        return self.shape == other.shape and torch.equal(self.mean, other.mean) and torch.equal(self.transform,
                                                                                              other.transform)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(self.shape, x)
        return whiten(x, self.mean, self.transform)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        check_shape(self.shape, x)
        return unwhiten(x, self.mean, self.inverse_transform)

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"mean": self.mean.contiguous(), "transform": self.transform.contiguous(),
                            "inverse_transform": self.inverse_transform.contiguous()},
                     {"shape": ",".join(map(str, self.shape)), "reg": str(self.reg), "kind": "zca"})

    @classmethod
    def load(cls, path: str | Path) -> ZCA:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise DistillError(f"ZCA file {path} does not exist; fit one with zca: fit in the recover config (or "
                               "`distillset squeeze trajectories --zca true`).")
        t = load_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != "zca":
            raise DistillError(f"{path} is not a ZCA file (no kind=zca metadata).")
        shape = tuple(int(v) for v in meta["shape"].split(","))
        return cls(t["mean"], t["transform"], t["inverse_transform"], shape, float(meta["reg"]))  # type: ignore[arg-type]


class InputTransform(nn.Module):
    """``[0, 1]`` images -> network input: ``(x - mean) / std``, then ZCA whitening when ``zca`` is given.

    The whitening runs in float32 even under autocast: bf16 would round away the small-eigenvalue directions that
    whitening amplifies.
    """

    def __init__(self, mean, std, zca: ZCA | None = None):
        super().__init__()
        c = len(mean)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, c, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, c, 1, 1).clone())
        self.zca_shape = zca.shape if zca is not None else None
        self.register_buffer("zca_mean", zca.mean.clone() if zca is not None else None)
        self.register_buffer("zca_w", zca.transform.clone() if zca is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.zca_w is None:
            return x
        check_shape(self.zca_shape, x)
        with torch.autocast(x.device.type, enabled=False):
            return whiten(x.float(), self.zca_mean, self.zca_w)
