"""Pixel parametrization: the synthetic images themselves are the learnable tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed  # noqa: F401  (re-exported for plugins)
from distillset.recover.base import Context, Parametrization, register_parametrization
from distillset.squeeze.inputs import unwhiten, whiten


@register_parametrization("pixel", paper="Wang et al. 2018, Dataset Distillation (arXiv:1811.10959)",
                          description="raw pixels (in normalised or ZCA-whitened units), clamped to [0, 1]")
class PixelSet(Parametrization):
    """Raw pixels, stored in normalised units ``(x - mean) / std`` so the SRe2L learning rate (0.25) keeps its meaning;
    ``render`` returns ``[0, 1]`` pixels and ``project_`` keeps them in range.

    Constructor arguments besides the ``Config`` are the engine's (every parametrization takes the same ones);
    ``ctx.mean``/``ctx.std`` are the reference normalisation of the run (the first teacher's).

    When the run whitens with ZCA (``ctx.zca``), the learnable tensor is the *whitened* image, as in KIP and MTT,
    which optimise in the whitened space: a gradient step there is ``W^-1``-smooth in pixel space, whereas a step
    on raw pixels would be ``W``-sharpened (noise in the small-eigenvalue, high-frequency directions). ``render``
    un-whitens, and ``project_`` clamps the pixels to ``[0, 1]`` and whitens them again (an exact projection: the map
    is linear and invertible), so the PNGs written are the images that were optimised.
    """

    @dataclass
    class Config:
        """Options of the pixel parametrization.

        Attributes:
            init: ``noise`` (Gaussian in normalised space, as SRe2L), ``real`` (a real image of the class, chosen
                by the image's own seed) or ``rded`` (EDC's initialisation: the image RDED selects and stitches
                from teacher-scored real crops; needs teachers).
            noise_std: standard deviation of the initial noise in normalised (or whitened) units.
            whitened: optimise whitened images when the run has a ZCA (default); false keeps raw normalised pixels.
            rded_options: options of the RDED selection used by ``init: rded`` (factor, crops, pool, ...).
            clamp: keep the pixels in [0, 1] after every step (default). False leaves them unconstrained, as DLG's
                dummy images: projecting after each L-BFGS step invalidates its curvature pairs and can stall it;
                the written images are clamped either way.
        """

        init: str = "noise"
        noise_std: float = 1.0
        whitened: bool = True
        rded_options: dict = field(default_factory=dict)
        clamp: bool = True

        def __post_init__(self):
            if self.init not in ("noise", "real", "rded"):
                raise DistillError(f"unknown pixel init '{self.init}'; use noise, real or rded.")
            if self.rded_options and self.init != "rded":
                raise DistillError("rded_options only apply with init: rded.")
            if self.init == "rded":
                from distillset.core.config import from_dict
                from distillset.recover.objectives.rded import RDED

                from_dict(RDED.Config, self.rded_options, what="pixel init 'rded'")

    def __init__(self, cfg: Config | None, classes: torch.Tensor, indices: torch.Tensor,
                 image_shape: tuple[int, int, int], seed: int, ctx: Context):
        super().__init__(cfg)
        init, noise_std, whitened = self.cfg.init, self.cfg.noise_std, self.cfg.whitened
        c = image_shape[0]
        mean, std = ctx.mean, ctx.std
        self.register_buffer("labels", classes.clone())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        data = torch.empty(len(classes), *image_shape)
        rded = self._rded(ctx) if init == "rded" else None
        for k, (cls, idx) in enumerate(zip(classes.tolist(), indices.tolist())):
            g = torch.Generator().manual_seed(mix_seed(seed, cls, idx))
            if init == "noise":
                data[k] = torch.randn(image_shape, generator=g) * noise_std
            elif rded is not None:
                img = rded.class_images(cls, ctx.ipc, ctx)[idx].cpu()
                data[k] = (img - self.mean[0].cpu()) / self.std[0].cpu()
            else:
                img = ctx.real.get(ctx.real.init_choice(cls, idx, seed)).cpu()[0]
                data[k] = (img - self.mean[0].cpu()) / self.std[0].cpu()
        self._lo = ((0 - self.mean) / self.std)
        self._hi = ((1 - self.mean) / self.std)
        zca = ctx.zca if whitened else None
        self.whitened = zca is not None
        if self.whitened:
            if tuple(zca.shape) != tuple(image_shape):
                raise DistillError(f"the run's ZCA is for {tuple(zca.shape)} images but the set is "
                                   f"{tuple(image_shape)}.")
            # not persistent: the whitening is the run's (saved once as zca.safetensors), not per-unit state
            self.register_buffer("zca_mean", zca.mean.clone(), persistent=False)
            self.register_buffer("zca_w", zca.transform.clone(), persistent=False)
            self.register_buffer("zca_winv", zca.inverse_transform.clone(), persistent=False)
            if init in ("real", "rded"):
                data = whiten(data, self.zca_mean, self.zca_w)
        self.data = nn.Parameter(data)
        if self.whitened:
            self.project_()

    def _rded(self, ctx: Context):
        """The RDED selector of ``init: rded`` (its per-class images are a pure function of (seed, class))."""
        from distillset.recover.objectives.rded import RDED

        if not ctx.teachers or ctx.real is None:
            raise DistillError("pixel init 'rded' scores real crops with the teachers: pass --teachers and --data.")
        rded = RDED.from_options(**self.cfg.rded_options)  # validated with the config (Config.__post_init__)
        rded.setup(ctx)
        return rded

    def render(self, index=None) -> torch.Tensor:
        x = self.data if index is None else self.data[index]
        if self.whitened:
            x = unwhiten(x, self.zca_mean, self.zca_winv)
        return x * self.std + self.mean

    @torch.no_grad()
    def project_(self) -> None:
        if not self.cfg.clamp:
            return
        lo, hi = self._lo.to(self.data.device), self._hi.to(self.data.device)
        if not self.whitened:
            self.data.copy_(torch.maximum(torch.minimum(self.data, hi), lo))
            return
        x_norm = (self.render() - self.mean) / self.std
        self.data.copy_(whiten(torch.maximum(torch.minimum(x_norm, hi), lo), self.zca_mean, self.zca_w))
