"""ZCA whitening of images, as KIP and MTT use for CIFAR (regularisation 0.1 added to the covariance eigenvalues, as
kornia's ``ZCAWhitening(eps=0.1)`` in MTT's code).

Fit once on real training images, save next to the distilled set as safetensors, and apply the same transform when
evaluating so students see synthetic and test images in one space; ``inverse`` maps whitened images back for
viewing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.errors import DistillError
from launch.io import load_tensors, save_tensors


@dataclass
class ZCA:
    """``whiten(x) = (flatten(x) - mean) @ W``, ``W = U diag(1 / sqrt(S + reg)) U^T`` from the data covariance."""

    mean: torch.Tensor  # (D,)
    transform: torch.Tensor  # (D, D)
    inverse_transform: torch.Tensor  # (D, D)
    shape: tuple[int, int, int]
    reg: float

    @classmethod
    def fit(cls, images: torch.Tensor, reg: float = 0.1) -> ZCA:
        """Fit on ``(N, C, H, W)`` float images (whatever normalisation evaluation will feed in)."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise DistillError("ZCA.fit needs a batch of at least 2 images (N, C, H, W).")
        if reg <= 0:
            raise DistillError(f"ZCA regularisation must be > 0, got {reg}.")
        x = images.detach().double().flatten(1)
        mean = x.mean(0)
        xc = x - mean
        cov = xc.t() @ xc / x.shape[0]
        s, u = torch.linalg.eigh(cov)
        s = s.clamp(min=0)
        w = (u * (s + reg).rsqrt()) @ u.t()
        winv = (u * (s + reg).sqrt()) @ u.t()
        return cls(mean.float(), w.float(), winv.float(), tuple(images.shape[1:]), float(reg))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        flat = (x.flatten(1) - self.mean.to(x)) @ self.transform.to(x)
        return flat.view(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        flat = x.flatten(1) @ self.inverse_transform.to(x) + self.mean.to(x)
        return flat.view(x.shape)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise DistillError(f"ZCA was fitted on images {self.shape} but got {tuple(x.shape[1:])}; fit it on the "
                               "same resolution.")

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"mean": self.mean.contiguous(), "transform": self.transform.contiguous(),
                            "inverse_transform": self.inverse_transform.contiguous()},
                     {"shape": ",".join(map(str, self.shape)), "reg": str(self.reg), "kind": "zca"})

    @classmethod
    def load(cls, path: str | Path) -> ZCA:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise DistillError(f"ZCA file {path} does not exist; fit one with recover.zca.ZCA.fit(...).save(path).")
        t = load_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != "zca":
            raise DistillError(f"{path} is not a ZCA file (no kind=zca metadata).")
        shape = tuple(int(v) for v in meta["shape"].split(","))
        return cls(t["mean"], t["transform"], t["inverse_transform"], shape, float(meta["reg"]))  # type: ignore[arg-type]
