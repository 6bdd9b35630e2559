"""Real training images indexed by class, for objectives that compare with real data and for init from real."""

from __future__ import annotations

import torch

from distillset.core.data import ImageSet
from distillset.core.partition import init_order


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
        self._orders: dict[tuple[int, int], torch.Tensor] = {}
        self._own = False

    def make_writable(self) -> None:
        """Give this object its own copy of the images before anything writes into them (DOORPING re-stamps its
        poisoned images): they may be the very tensor a data source caches."""
        if not self._own:
            self.images = self.images.clone()
            self._own = True

    def init_choice(self, c: int, i: int, seed: int) -> torch.Tensor:
        """The real image that synthetic image ``i`` of class ``c`` starts from (init from real), as a ``(1,)`` index.

        A seeded permutation of the class, so images ``0..ipc-1`` of a class are distinct real images (repeats only
        when ``ipc`` exceeds the class size), and a pure function of ``(seed, class, index)`` whatever the unit
        layout. The ``random`` baseline picks exactly these images, so "distilled vs random" measures what the
        optimisation added to its own starting point.
        """
        key = (int(seed), int(c))
        if key not in self._orders:
            self._orders[key] = init_order(self.index[c], c, seed)
        order = self._orders[key]
        return order[int(i) % order.numel()].view(1)

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
