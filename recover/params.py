"""Pixel parametrization: the synthetic images themselves are the learnable tensor."""

from __future__ import annotations

import torch
from torch import nn

from recover.base import Context, Parametrization, register_parametrization


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), so seeds are a pure function of (seed, class, index)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


@register_parametrization("pixel")
class PixelSet(Parametrization):
    """Raw pixels, stored in normalised units ``(x - mean) / std`` so the SRe2L learning rate (0.25) keeps its meaning;
    ``render`` returns ``[0, 1]`` pixels and ``project_`` keeps them in range.

    Constructor arguments are the engine's (every parametrization takes the same ones); ``ctx.options`` holds the
    reference ``mean``/``std`` of the first teacher.

    Options:
        init: ``noise`` (Gaussian in normalised space, as SRe2L) or ``real`` (a real image of the class, chosen by the
            image's own seed).
        noise_std: standard deviation of the initial noise in normalised units.
    """

    def __init__(self, classes: torch.Tensor, indices: torch.Tensor, image_shape: tuple[int, int, int], seed: int,
                 ctx: Context, init: str = "noise", noise_std: float = 1.0):
        super().__init__()
        from launch.errors import DistillError

        if init not in ("noise", "real"):
            raise DistillError(f"unknown pixel init '{init}'; use noise or real.")
        c = image_shape[0]
        mean, std = ctx.options.get("mean", [0.5] * c), ctx.options.get("std", [0.5] * c)
        self.register_buffer("labels", classes.clone())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        data = torch.empty(len(classes), *image_shape)
        for k, (cls, idx) in enumerate(zip(classes.tolist(), indices.tolist())):
            g = torch.Generator().manual_seed(mix_seed(seed, cls, idx))
            if init == "noise":
                data[k] = torch.randn(image_shape, generator=g) * noise_std
            else:
                img = ctx.real.get(ctx.real.init_choice(cls, idx, seed)).cpu()[0]
                data[k] = (img - self.mean[0].cpu()) / self.std[0].cpu()
        self.data = nn.Parameter(data)
        self._lo = ((0 - self.mean) / self.std)
        self._hi = ((1 - self.mean) / self.std)

    def render(self, index=None) -> torch.Tensor:
        x = self.data if index is None else self.data[index]
        return x * self.std + self.mean

    @torch.no_grad()
    def project_(self) -> None:
        lo, hi = self._lo.to(self.data.device), self._hi.to(self.data.device)
        self.data.copy_(torch.maximum(torch.minimum(self.data, hi), lo))
