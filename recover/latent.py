"""GLaD and LD3M as parametrizations: the synthetic set is a set of latents of a frozen generative prior.

Registered as ``ld3m`` and ``glad``, so every objective (BN inversion, DC, DM, MTT, ...) runs over latents unchanged:
``render`` decodes the latents to ``[0, 1]`` images with gradients. With ``chunk > 0`` rendering goes through
:func:`generative.chunked.chunked_render`, so the memory of back-propagating through the prior is bounded by the chunk,
not by the number of images.

Every image's initial latents are a pure function of (seed, class, index): the real image used to initialise it and
the noise it starts from are drawn from a generator seeded with ``mix_seed(seed, class, index)``.

``state()`` returns the latents (and conditioning), labels and indices; the engine saves them under
``latents/unit-XXXXXX.safetensors`` and :func:`render_saved` re-renders a distilled set from them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.partition import mix_seed
from distillset.generative.chunked import chunked_render
from distillset.generative.prior import Prior, from_pretrained
from distillset.recover.base import Context, Parametrization, register_parametrization

log = logging.getLogger("distillset.recover")


def _parse_learn(learn, names: tuple[str, ...], kind: str) -> set[str]:
    if learn is None:
        return set(names)
    items = [s.strip() for s in learn.split(",")] if isinstance(learn, str) else list(learn)
    bad = [s for s in items if s not in names]
    if bad or not items:
        raise DistillError(f"{kind} can learn {', '.join(names)}; got learn={learn!r}.")
    return set(items)


@dataclass
class LatentConfig:
    """Options every latent set has.

    Attributes:
        prior: folder of the prior (`distillset prior train --kind KIND`).
        chunk: images rendered per graph in backward (0 = all at once; memory grows with the number of images).
        learn: which latents are optimised (comma-separated names; unset = all).
        init: ``real`` (encode a real image of the class; needs --data) or ``noise``.
        encode_batch: real images encoded per batch at init.
    """

    prior_kind: ClassVar[str] = ""
    latent_names: ClassVar[tuple[str, ...]] = ()
    prior: str = ""
    chunk: int = 16
    learn: list[str] | str | None = None
    init: str = "real"
    encode_batch: int = 32

    def __post_init__(self):
        kind = self.prior_kind
        if not self.prior:
            raise DistillError(f"parametrization '{kind}' needs a prior folder: set param_options prior: PATH (train "
                               f"one with `distillset prior train --kind {kind}`).")
        if self.chunk < 0:
            raise DistillError(f"chunk must be >= 0 (0 = render all images with one graph), got {self.chunk}.")
        if self.init not in ("real", "noise"):
            raise DistillError(f"unknown {kind} init '{self.init}'; use real or noise.")
        _parse_learn(self.learn, self.latent_names, kind)


class LatentSet(Parametrization):
    """Latents of a frozen prior, one set per image. Subclasses name the prior kind and the latent tensors."""

    prior_kind: ClassVar[str] = ""
    latent_names: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type] = LatentConfig

    def __init__(self, cfg: LatentConfig | None, classes: torch.Tensor, indices: torch.Tensor,
                 image_shape: tuple[int, int, int], seed: int, ctx: Context):
        super().__init__(cfg)
        kind = self.prior_kind
        prior, chunk, learn, init = self.cfg.prior, self.cfg.chunk, self.cfg.learn, self.cfg.init
        encode_batch = self.cfg.encode_batch
        p = from_pretrained(prior, kind=kind, num_classes=ctx.num_classes, image_shape=tuple(image_shape),
                            device=ctx.device)
        object.__setattr__(self, "_prior", self.configure(p))  # not a submodule: frozen, shared, never saved
        self.chunk = int(chunk)
        learnt = _parse_learn(learn, self.latent_names, kind)
        self.register_buffer("labels", classes.clone())
        self.register_buffer("indices", indices.clone().to(classes.device))
        latents = self._initial_latents(classes, indices, seed, ctx, init, encode_batch)
        self.prior.check_latents({k: v for k, v in latents.items()}, f"initial {kind} latents")
        for name in self.latent_names:
            t = latents[name].detach().clone().float()
            if name in learnt:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        # autograd calls the chunked backward only if some input requires grad; this scalar is that input
        object.__setattr__(self, "_dummy", torch.zeros((), requires_grad=True))
        self._cache: dict[bool, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------- subclass hooks
    @property
    def prior(self) -> Prior:
        return self._prior

    def configure(self, prior: Prior) -> Prior:
        """The prior as this set uses it (e.g. GLaD split at another layer)."""
        return prior

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def render_latents(self, lat: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- init
    def _initial_latents(self, classes, indices, seed, ctx, init, encode_batch) -> dict[str, torch.Tensor]:
        gens = [torch.Generator().manual_seed(mix_seed(seed, c, i)) for c, i in zip(classes.tolist(), indices.tolist())]
        labels = classes.to(self.prior.device)
        if init == "real" and ctx.real is None:
            log.info("%s: no real data in this run, so latents start from the prior's noise; to start from encoded "
                     "real images pass --data SPEC and param_options init: real", self.prior_kind)
            init = "noise"
        if init == "noise":
            lat = self.prior.sample_latents(labels, gens)
        else:
            real = torch.cat([ctx.real.get(ctx.real.init_choice(c, i, seed))
                              for c, i in zip(classes.tolist(), indices.tolist())])
            lat = {}
            with torch.no_grad():
                for s in range(0, len(real), encode_batch):
                    part = self.prior.encode(real[s:s + encode_batch].to(self.prior.device), labels[s:s + encode_batch])
                    for k, v in part.items():
                        lat.setdefault(k, []).append(v.detach())
            lat = {k: torch.cat(v) for k, v in lat.items()}
        lat.update(self.conditioning(labels))
        return lat

    # --------------------------------------------------------------------------------------------- render
    def _index(self, index) -> torch.Tensor:
        n = len(self)
        dev = self.labels.device
        if index is None:
            return torch.arange(n, device=dev)
        if isinstance(index, slice):
            return torch.arange(n, device=dev)[index]
        index = torch.as_tensor(index, device=dev)
        if index.dtype == torch.bool:
            return torch.nonzero(index).flatten()
        return index.long().flatten()

    def _render_index(self, idx: torch.Tensor) -> torch.Tensor:
        return self.render_latents({k: getattr(self, k)[idx] for k in self.latent_names})

    @contextlib.contextmanager
    def step_cache(self):
        """Inside one engine step, render every image once (per grad mode) and serve subsets from it: DM/DC ask
        class by class, and one batched pass through the prior costs far less than one small pass per class. The
        gradient of every subset flows back through the one shared rendering."""
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None

    def render(self, index=None) -> torch.Tensor:
        if self._cache is not None:
            grad = torch.is_grad_enabled()
            if not grad and True in self._cache:
                self._cache[False] = self._cache[True].detach()
            if grad not in self._cache:
                self._cache[grad] = self._render_uncached()
            full = self._cache[grad]
            return full if index is None else full[self._index(index)]
        return self._render_uncached(index)

    def _render_uncached(self, index=None) -> torch.Tensor:
        idx = self._index(index)
        if self.chunk and len(idx) > self.chunk:
            return chunked_render(self._render_index, idx, self.chunk, self._dummy)
        return self._render_index(idx)

    @torch.no_grad()
    def images_uint8(self) -> torch.Tensor:
        step = self.chunk or 64
        idx = self._index(None)
        out = [self._render_index(idx[i:i + step]) for i in range(0, len(idx), step)]
        return (torch.cat(out).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    # ----------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k).detach() for k in self.latent_names}
        out["labels"], out["indices"] = self.labels.detach(), self.indices.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        lat = {k: v for k, v in state_dict.items() if k in self.latent_names}
        self.prior.check_latents(lat, f"saved {self.prior_kind} state")
        for k, v in lat.items():
            if v.shape[0] != len(self):
                raise DistillError(f"saved {self.prior_kind} state has {v.shape[0]} images for '{k}' but this unit "
                                   f"has {len(self)}; it belongs to another run layout (ipc / classes_per_unit).")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@register_parametrization("ld3m", paper="Moser et al. 2024, Latent Dataset Distillation with Diffusion Models "
                          "(LD3M, arXiv:2403.03881)")
class LD3MSet(LatentSet):
    """LD3M: learn the initial diffusion latent ``z_T`` and a class-conditioning vector per image."""

    @dataclass
    class Config(LatentConfig):
        """Options of LD3M (``param_options``).

        Attributes:
            prior: folder of an LD3M prior (``distillset prior train --kind ld3m``, or a diffusers class-conditional
                LDM folder).
            learn: which latents are optimised, from ``z_T,cond``.
            steps: DDIM steps (0 = the prior's).
            blend: weight of ``z_T`` in the predicted ``x0`` at the first step (falls linearly to ``blend / steps``).
            checkpointing: gradient-checkpoint every UNet call.
        """

        prior_kind: ClassVar[str] = "ld3m"
        latent_names: ClassVar[tuple[str, ...]] = ("z_T", "cond")
        steps: int = 0
        blend: float = 1.0
        checkpointing: bool = True

        def __post_init__(self):
            super().__post_init__()
            if self.steps < 0 or not 0.0 <= self.blend <= 1.0:
                raise DistillError(f"ld3m needs steps >= 0 and 0 <= blend <= 1, got steps={self.steps}, "
                                   f"blend={self.blend}.")

    prior_kind = "ld3m"
    latent_names = ("z_T", "cond")

    def __init__(self, cfg: Config | None, classes, indices, image_shape, seed, ctx):
        c = cfg if cfg is not None else self.Config()
        self._steps, self._blend, self._ckpt = int(c.steps), float(c.blend), bool(c.checkpointing)
        super().__init__(c, classes, indices, image_shape, seed, ctx)

    def conditioning(self, labels):
        return {"cond": self.prior.conditioning(labels)}

    def render_latents(self, lat):
        return self.prior.render({"z_T": lat["z_T"]}, lat["cond"], steps=self._steps or None, blend=self._blend,
                                 checkpointing=self._ckpt)


@register_parametrization("glad", paper="Cazenavette et al. 2023, Generalizing Dataset Distillation via Deep "
                          "Generative Prior (GLaD, arXiv:2305.01649)")
class GLaDSet(LatentSet):
    """GLaD: learn per-image W+ style codes ``w`` of the layers after ``layer`` and the feature map ``f`` there."""

    @dataclass
    class Config(LatentConfig):
        """Options of GLaD (``param_options``).

        Attributes:
            prior: folder of a GLaD prior (``distillset prior train --kind glad``).
            learn: which latents are optimised, from ``w,f``.
            init: ``noise`` (truncated random styles of the class) or ``real`` (invert a real image of the class).
            layer: split the generator after this synthesis layer (-1 = the prior's).
        """

        prior_kind: ClassVar[str] = "glad"
        latent_names: ClassVar[tuple[str, ...]] = ("w", "f")
        init: str = "noise"
        layer: int = -1

    prior_kind = "glad"
    latent_names = ("w", "f")

    def __init__(self, cfg: Config | None, classes, indices, image_shape, seed, ctx):
        c = cfg if cfg is not None else self.Config()
        self._layer = int(c.layer)
        super().__init__(c, classes, indices, image_shape, seed, ctx)

    def configure(self, prior):
        return prior if self._layer < 0 else prior.with_layer(self._layer)

    def render_latents(self, lat):
        return self.prior.render(lat)


def render_saved(folder: str | Path, prior: str | None = None, device: str | torch.device = "cpu",
                 chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-render a distilled set from its saved latents: ``(uint8 images (N, C, H, W), labels)``, in unit order.

    ``prior`` overrides the prior folder recorded in the manifest (e.g. when it moved).
    """
    from distillset.core.distilled import manifest_units, read_manifest
    from distillset.core.io import content_sha256, inside, load_tensors

    folder = Path(folder)
    man = read_manifest(folder)
    kind = man.get("parametrization")
    cls = {"ld3m": LD3MSet, "glad": GLaDSet}.get(kind)
    if cls is None:
        raise DistillError(f"{folder} was made with parametrization '{kind}', which has no latents to re-render.")
    opts = dict(man.get("config", {}).get("param_options", {}))
    recorded = (man.get("inputs") or {}).get("param_options.prior")
    if prior is None and recorded and content_sha256(Path(str(opts.get("prior", "")))) != recorded.get("sha256"):
        # the prior lives outside the set: the recorded folder is used only if it still holds what was distilled
        raise DistillError(f"the prior {opts.get('prior')} named by {folder}/manifest.json is not the one the set "
                           "was distilled with (its content changed); pass prior=PATH to use another one.")
    p = from_pretrained(prior or opts.get("prior", ""), kind=kind, device=device)
    if kind == "glad" and int(opts.get("layer", -1)) >= 0:
        p = p.with_layer(int(opts["layer"]))
    units = manifest_units(folder, man)
    if units is not None:  # every unit's latents, as the manifest lists them
        files = [inside(folder, f"latents/unit-{u['index']:06d}.safetensors", "latents") for u in units]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DistillError(f"latents file {missing[0]} is missing ({len(missing)} of {len(files)}); re-run the "
                               "same `distillset recover` command to write it again.")
    else:
        files = [inside(folder, f.relative_to(folder), "latents")
                 for f in sorted((folder / "latents").glob("unit-*.safetensors"))]
    if not files:
        raise DistillError(f"{folder}/latents holds no unit-*.safetensors; the run did not save latents.")
    images, labels = [], []
    for f in files:
        st = load_tensors(f)
        lat = {k: st[k].to(device) for k in cls.latent_names}
        p.check_latents(lat, str(f))
        for i in range(0, len(st["labels"]), chunk):
            part = {k: v[i:i + chunk] for k, v in lat.items()}
            with torch.no_grad():
                if kind == "ld3m":
                    x = p.render({"z_T": part["z_T"]}, part["cond"], steps=int(opts.get("steps", 0)) or None,
                                 blend=float(opts.get("blend", 1.0)))
                else:
                    x = p.render(part)
            images.append((x.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        labels.append(st["labels"])
    return torch.cat(images), torch.cat(labels)
