"""GLaD prior: a GAN-style generator whose latents are a per-image style code and an intermediate feature map.

GLaD optimises, per synthetic image, the style codes of the synthesis layers after layer ``k`` (W+) and the feature
map the generator produces after layer ``k``; the layers after ``k`` act as a learnt image prior while the feature
map keeps enough freedom to fit the objective.

Any generator works that exposes (duck-typed; :class:`StyleGenerator` is the built-in one):

* attributes ``num_classes``, ``img_channels``, ``img_size``, ``z_dim``, ``w_dim``, ``num_ws`` (style codes used by
  the synthesis network, one per layer), and a buffer ``w_avg`` ``(num_classes, w_dim)`` of class-mean styles;
* ``mapping(z, labels) -> w`` ``(N, w_dim)``: noise + class -> style;
* ``features(ws, layer) -> f``: synthesis up to (and including) layer ``layer`` from W+ codes ``(N, num_ws, w_dim)``;
* ``synthesize(f, ws_tail, layer) -> images`` in ``[-1, 1]``: synthesis from layer ``layer`` on, with the W+ codes
  of the remaining layers ``(N, num_ws - layer, w_dim)``;
* ``save_pretrained(folder)`` / ``from_pretrained(folder)`` (a diffusers ``ModelMixin`` gives both).

A prior folder holds ``prior.json`` (``"kind": "glad"``, ``"generator_class": "module:Class"``, ``"layer"``) and
``generator/`` (the generator's ``save_pretrained`` output). To use another generator (e.g. a StyleGAN port), wrap it
in a module with the entry points above, save it with ``save_pretrained`` and write its import path in
``generator_class``; then either register the class in code (:func:`register_generator_class`) or allow importing
the module a prior.json names with ``--trust-code`` (``DISTILLSET_TRUST_CODE=1``): a prior folder is data, and
the module it names is only imported when its user says so.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from distillset.core.errors import DistillError
from distillset.generative.prior import Prior, register_prior, write_prior_meta

log = logging.getLogger("distillset.generative")


class _AdaIN(nn.Module):
    """Instance norm whose per-channel scale and bias come from the style code."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.affine = nn.Linear(w_dim, 2 * channels)
        with torch.no_grad():  # start near the identity style (scale 1, bias 0) but not at it, so w gets gradients
            self.affine.weight.mul_(0.25)
            self.affine.bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, bias = self.affine(w).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return F.instance_norm(x) * scale + bias


class _StyleBlock(nn.Module):
    """2x upsample -> (conv3x3 -> AdaIN -> LeakyReLU) x 2."""

    def __init__(self, cin: int, cout: int, w_dim: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1, self.norm2 = _AdaIN(cout, w_dim), _AdaIN(cout, w_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.leaky_relu(self.norm1(self.conv1(x), w), 0.2)
        return F.leaky_relu(self.norm2(self.conv2(x), w), 0.2)


class StyleGenerator(ModelMixin, ConfigMixin):
    """A compact class-conditional StyleGAN-like generator: mapping MLP, learnt 4x4 constant, AdaIN style blocks.

    Layer ``i`` (1-based) is the ``i``-th style block; layer 0 is the constant. ``num_ws = blocks + 1`` (one style per
    block, one for the RGB head).
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, img_channels: int = 3, img_size: int = 32, z_dim: int = 64,
                 w_dim: int = 128, width: int = 64, map_layers: int = 2):
        super().__init__()
        blocks = int(math.log2(img_size // 4))
        if 4 * 2 ** blocks != img_size:
            raise DistillError(f"the GLaD generator needs a power-of-two image size >= 8, got {img_size}.")
        self.num_classes, self.img_channels, self.img_size = num_classes, img_channels, img_size
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, blocks + 1
        self.embed = nn.Embedding(num_classes, z_dim)
        layers, d = [], 2 * z_dim
        for _ in range(map_layers):
            layers += [nn.Linear(d, w_dim), nn.LeakyReLU(0.2)]
            d = w_dim
        self.mapping_net = nn.Sequential(*layers)
        chans = [min(width * 2, width * 2 ** max(0, 2 - i)) for i in range(blocks + 1)]  # wide at low resolution
        self.const = nn.Parameter(torch.randn(chans[0], 4, 4))
        self.blocks = nn.ModuleList(_StyleBlock(chans[i], chans[i + 1], w_dim) for i in range(blocks))
        self.rgb_norm = _AdaIN(chans[-1], w_dim)
        self.to_rgb = nn.Conv2d(chans[-1], img_channels, 1)
        self.register_buffer("w_avg", torch.zeros(num_classes, w_dim))

    def mapping(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        e = self.embed(labels)
        e = e * torch.rsqrt(e.square().mean(1, keepdim=True) + 1e-8)
        return self.mapping_net(torch.cat([z, e], 1))

    def features(self, ws: torch.Tensor, layer: int) -> torch.Tensor:
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        for i in range(layer):
            x = self.blocks[i](x, ws[:, i])
        return x

    def synthesize(self, f: torch.Tensor, ws_tail: torch.Tensor, layer: int) -> torch.Tensor:
        x = f
        for j, i in enumerate(range(layer, len(self.blocks))):
            x = self.blocks[i](x, ws_tail[:, j])
        return torch.tanh(self.to_rgb(F.leaky_relu(self.rgb_norm(x, ws_tail[:, -1]), 0.2)))

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ws = self.mapping(z, labels).unsqueeze(1).expand(-1, self.num_ws, -1)
        return self.synthesize(self.features(ws, 0), ws, 0)


def build_glad(num_classes: int, image_shape: tuple[int, int, int], z_dim: int = 64, w_dim: int = 128,
               width: int = 64, layer: int = 1, truncation: float = 0.7,
               class_names: list[str] | None = None) -> GLaDPrior:
    """An untrained GLaD prior with the built-in generator (tests build one in well under a second)."""
    g = StyleGenerator(num_classes, image_shape[0], image_shape[-1], z_dim, w_dim, width)
    return GLaDPrior(g, glad_meta(g, layer, truncation, class_names))


def glad_meta(g, layer: int, truncation: float = 0.7, class_names=None) -> dict:
    if not 0 <= layer < g.num_ws:
        raise DistillError(f"GLaD layer must be in 0..{g.num_ws - 1} for this generator, got {layer}.")
    with torch.no_grad():
        f = g.features(torch.zeros(1, g.num_ws, g.w_dim, device=g.w_avg.device), layer)
    cls = type(g)
    return {"kind": "glad", "num_classes": int(g.num_classes),
            "image_shape": [int(g.img_channels), int(g.img_size), int(g.img_size)],
            "latent_shapes": {"w": [g.num_ws - layer, g.w_dim], "f": list(f.shape[1:])}, "layer": int(layer),
            "truncation": float(truncation), "generator_class": f"{cls.__module__}:{cls.__qualname__}",
            "class_names": class_names or [str(i) for i in range(g.num_classes)]}


# generator classes a prior.json may name without --trust-code: the built-in one (under the name written before
# and after the namespace move) and those registered in code
GENERATOR_CLASSES: dict[str, type] = {}
TRUST_ENV = "DISTILLSET_TRUST_CODE"


def register_generator_class(cls: type, name: str | None = None) -> type:
    """Allow ``prior.json`` to name ``cls`` (as ``module:Class``, or ``name``) without trusting arbitrary code."""
    GENERATOR_CLASSES[name or f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


def generator_class(spec: str, folder: Path) -> type:
    """The generator class ``prior.json`` names: a registered one, or (only with --trust-code) any importable one."""
    import os

    if spec in GENERATOR_CLASSES:
        return GENERATOR_CLASSES[spec]
    if os.environ.get(TRUST_ENV, "") not in ("1", "true", "yes"):
        raise DistillError(f"{folder}/prior.json names generator class '{spec}', which is not a registered generator "
                           f"({', '.join(sorted(GENERATOR_CLASSES))}); importing it runs its code: pass --trust-code "
                           f"(or set {TRUST_ENV}=1) if you trust that folder.")
    mod, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        raise DistillError(f"{folder}/prior.json names generator class '{spec}', which cannot be imported; "
                           "install the package that provides it.") from None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise DistillError(f"{folder}/prior.json names '{spec}', which is not a generator class (no from_pretrained); "
                           "see generative/glad.py for what a GLaD generator provides.")
    return cls


@register_prior("glad", paper="Cazenavette et al. 2023, Generalizing Dataset Distillation via Deep Generative Prior "
                "(arXiv:2305.01649)")
class GLaDPrior(Prior):
    """A generator split at ``layer``: latents ``w`` (W+ codes of the remaining layers) and ``f`` (features)."""

    def __init__(self, generator: nn.Module, meta: dict):
        super().__init__(meta)
        self.generator = generator
        self.layer = int(meta.get("layer", 1))
        self.truncation = float(meta.get("truncation", 0.7))
        self.invert_steps = 30

    def with_layer(self, layer: int) -> GLaDPrior:
        """The same generator split at another layer (shares weights)."""
        if layer == self.layer:
            return self
        return GLaDPrior(self.generator, {**self.meta, **glad_meta(self.generator, layer, self.truncation,
                                                                    self.meta.get("class_names"))})

    def _ws(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = self.generator
        w = g.mapping(z, labels)
        avg = g.w_avg[labels]
        w = avg + self.truncation * (w - avg)
        return w.unsqueeze(1).expand(-1, g.num_ws, -1)

    def sample_latents(self, labels, generators):
        g = self.generator
        z = torch.stack([torch.randn(g.z_dim, generator=gen) for gen in generators]).to(self.device)
        labels = labels.to(self.device)
        with torch.no_grad():
            ws = self._ws(labels, z)
            f = g.features(ws, self.layer)
        return {"w": ws[:, self.layer:].contiguous(), "f": f}

    def encode(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """GAN inversion: start at the class-mean style, fit (w, f) to ``images`` by a few Adam steps on MSE."""
        g = self.generator
        labels = labels.to(self.device)
        with torch.no_grad():
            ws = g.w_avg[labels].unsqueeze(1).expand(-1, g.num_ws, -1)
            lat = {"w": ws[:, self.layer:].clone(), "f": g.features(ws, self.layer)}
        lat = {k: v.clone().requires_grad_(True) for k, v in lat.items()}
        opt = torch.optim.Adam(lat.values(), lr=0.05)
        with torch.enable_grad():
            for _ in range(self.invert_steps):
                # a sum of per-image losses: each image's Adam trajectory is independent of the batch it is in
                err = (self.render(lat) - images.to(self.device)).square()
                loss = err.flatten(1).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {k: v.detach() for k, v in lat.items()}

    def render(self, latents: dict[str, torch.Tensor], cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.generator.synthesize(latents["f"], latents["w"], self.layer)
        return (x * 0.5 + 0.5).clamp(0, 1)

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        self.generator.save_pretrained(folder / "generator")
        write_prior_meta(folder, {**self.meta, **(extra or {})})

    @classmethod
    def load(cls, folder: Path, meta: dict) -> GLaDPrior:
        spec = str(meta.get("generator_class", "distillset.generative.glad:StyleGenerator"))
        gcls = generator_class(spec, folder)
        if not (folder / "generator").exists():
            raise DistillError(f"{folder} is missing generator/; a GLaD prior folder holds prior.json and the "
                               "generator's save_pretrained output in generator/.")
        try:
            g = gcls.from_pretrained(folder / "generator", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DistillError(f"could not load the generator in {folder}/generator ({msg}); the folder is "
                               "incomplete or was written by another version.") from None
        for attr in ("mapping", "features", "synthesize", "num_ws", "w_avg"):
            if not hasattr(g, attr):
                raise DistillError(f"generator class '{spec}' has no '{attr}'; a GLaD generator needs mapping, "
                                   "features, synthesize, num_ws and w_avg (see generative/glad.py).")
        fresh = glad_meta(g, int(meta.get("layer", 1)), float(meta.get("truncation", 0.7)))
        saved = {k: list(v) for k, v in meta.get("latent_shapes", fresh["latent_shapes"]).items()}
        if saved != {k: list(v) for k, v in fresh["latent_shapes"].items()}:
            raise DistillError(f"{folder}/prior.json says latents {meta['latent_shapes']} but the generator makes "
                               f"{fresh['latent_shapes']}; the folder mixes parts of different priors, re-train it.")
        return cls(g, {**fresh, **meta})


register_generator_class(StyleGenerator, "distillset.generative.glad:StyleGenerator")
register_generator_class(StyleGenerator, "generative.glad:StyleGenerator")  # folders written before the namespace move
