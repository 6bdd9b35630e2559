"""Real training images indexed by class, for objectives that compare with real data and for init from real."""

from __future__ import annotations

import torch

from launch.data import ImageSet


class RealData:
    """Real images (uint8 on CPU, or on ``device`` when small) with per-class index lists.

    ``sample`` returns ``[0, 1]`` float images on ``device``; randomness comes from the caller's generator.
    """

    def __init__(self, images: ImageSet, device: torch.device | str = "cpu", keep_on_device_bytes: int = 1 << 30):
        self.set = images
        self.device = torch.device(device)
        on_device = images.images.numel() <= keep_on_device_bytes
        self.images = images.images.to(self.device) if on_device else images.images
        self.labels = images.labels
        self.num_classes = images.num_classes
        self.index = [torch.nonzero(images.labels == c).flatten() for c in range(self.num_classes)]

    def count(self, c: int) -> int:
        return int(self.index[c].numel())

    def to_float(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.to(self.device, non_blocking=True).float().div_(255.0)

    def indices(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random indices of class ``c`` (without replacement when possible)."""
        idx = self.index[c]
        if n <= idx.numel():
            return idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return idx[torch.randint(idx.numel(), (n,), generator=generator)]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random real images of class ``c`` as ``[0, 1]`` floats on ``device``."""
        return self.to_float(self.images[self.indices(c, n, generator).to(self.images.device)])

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.to_float(self.images[index.to(self.images.device)])

    def of_class(self, c: int) -> torch.Tensor:
        return self.get(self.index[c])
