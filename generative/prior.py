"""One interface over generative priors: encode real images, render latents, report cost, load from a local folder.

A prior folder holds ``prior.json`` (what kind of prior, its classes, image shape, latent shapes, defaults) beside the
weights of its parts. :func:`from_pretrained` reads it and dispatches to the kind's loader; it never touches the
network. A diffusers pipeline folder without ``prior.json`` (``model_index.json`` with a ``vqvae``/``vae`` and a
class-conditional ``unet``) is read as an LD3M prior directly (see :mod:`generative.ld3m`).

Latents are a ``dict[str, Tensor]`` (batch first) plus an optional conditioning tensor; ``render`` maps them to
``[0, 1]`` images ``(N, C, H, W)`` with gradients.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from distillset.core.errors import DistillError
from distillset.core.registry import Registry

log = logging.getLogger("distillset.generative")

PRIOR_FORMAT = "distillset-prior/1"
PRIORS = Registry("prior", "distillset.priors", ("distillset.generative.glad", "distillset.generative.ld3m"))


def register_prior(kind: str, *, paper: str = "", description: str = ""):
    """Class decorator: ``kind`` (the ``prior.json`` field) -> prior class, as an entry of :data:`PRIORS`."""

    def deco(cls):
        cls.kind = kind
        return PRIORS.register(kind, paper=paper, description=description)(cls)

    return deco


class Prior(nn.Module):
    """A frozen generative prior. Subclasses fill ``meta`` and implement the abstract methods.

    ``meta`` keys every prior has: ``kind``, ``num_classes``, ``image_shape`` ``[C, H, W]``, ``latent_shapes``
    (name -> per-image shape), ``class_names``.
    """

    kind: ClassVar[str] = ""

    def __init__(self, meta: dict):
        super().__init__()
        self.meta = dict(meta)

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.meta["image_shape"])  # type: ignore[return-value]

    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every latent tensor (the conditioning included, under ``cond``)."""
        return {k: tuple(v) for k, v in self.meta["latent_shapes"].items()}

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -------------------------------------------------------------------------------------------- contract
    def encode(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latents (without ``cond``) that render close to ``images`` (``[0, 1]``, ``(N, C, H, W)``)."""
        raise NotImplementedError

    def sample_latents(self, labels: torch.Tensor, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Latents drawn from the prior for ``labels``, one generator per image (init without real data)."""
        raise NotImplementedError

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The per-image conditioning for ``labels`` (a class-embedding row), or ``None`` if the prior has none."""
        return None

    def render(self, latents: dict[str, torch.Tensor], cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[0, 1]`` images ``(N, C, H, W)`` from latents, differentiable in the latents and ``cond``."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, meta: dict) -> Prior:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ utilities
    def check_latents(self, latents: dict[str, torch.Tensor], where: str = "latents") -> None:
        """Fail in one line when latents were made for another prior (names or per-image shapes differ)."""
        shapes = self.latent_shapes()
        for name, t in latents.items():
            if name not in shapes:
                raise DistillError(f"{where} hold '{name}', which a {self.kind} prior does not use (it uses "
                                   f"{sorted(shapes)}); they were made with another kind of prior.")
            if tuple(t.shape[1:]) != shapes[name]:
                raise DistillError(f"{where}: latent '{name}' has per-image shape {tuple(t.shape[1:])} but this "
                                   f"prior expects {shapes[name]}; use the prior folder the latents were made with.")

    def report(self, n: int = 1) -> dict[str, float]:
        """Memory and compute of rendering ``n`` images and back-propagating into their latents, per image.

        ``activation_bytes`` is the peak of tensors held for backward (measured with saved-tensor hooks, so it is
        the same on CPU and GPU); ``flops`` counts matmul/conv FLOPs of forward + backward.
        """
        from torch.utils.flop_counter import FlopCounterMode

        labels = torch.arange(n, device=self.device) % self.num_classes
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        lat = {k: v.detach().requires_grad_(True) for k, v in self.sample_latents(labels, gens).items()}
        cond = self.conditioning(labels)
        cond = cond.detach().requires_grad_(True) if cond is not None else None
        meter = SavedTensorMeter()
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as fc, meter:
            x = self.render(lat, cond)
            x.square().sum().backward()
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in self.parameters())
        return {"images": n, "params": params, "param_bytes": sum(p.numel() * p.element_size()
                                                                   for p in self.parameters()),
                "flops_per_image": fc.get_total_flops() / n, "activation_bytes_per_image": meter.peak / n,
                "seconds_per_image": seconds / n,
                "latent_floats_per_image": sum(math.prod(s) for s in self.latent_shapes().values())}


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward while active (a device-independent activation-memory meter).

    Storages are counted once however many saved tensors view them; a storage stops counting when the autograd
    graph releases its last reference.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return t
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._refs:
            self._refs[key][0] += 1
        else:
            self._refs[key] = [1, st.nbytes()]
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        return _Held(t, key, self)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class _Held:
    __slots__ = ("key", "meter", "t")

    def __init__(self, t, key, meter):
        self.t, self.key, self.meter = t, key, meter

    def __del__(self):
        with contextlib.suppress(Exception):
            self.meter.release(self.key)


# ------------------------------------------------------------------------------------------------------ loading

_CACHE: dict[tuple[str, str], Prior] = {}


def read_prior_meta(folder: str | Path) -> dict:
    """``prior.json`` of ``folder`` (or the meta derived from a diffusers pipeline folder), with clear errors."""
    folder = Path(folder)
    if not folder.exists():
        raise DistillError(f"prior folder {folder} does not exist; train one with `distillset prior train --out "
                           f"{folder}` or pass the path of an existing prior.")
    if not folder.is_dir():
        raise DistillError(f"prior path {folder} is a file, not a folder; pass the folder holding prior.json.")
    path = folder / "prior.json"
    if not path.exists():
        if (folder / "model_index.json").exists():
            from distillset.generative.diffusers_folder import meta_from_diffusers_folder

            return meta_from_diffusers_folder(folder)
        what = " (it looks like a backbone folder from `distillset squeeze`)" if (folder / "config.json").exists() \
            else ""
        raise DistillError(f"{folder} is not a generative prior folder{what}: it has no prior.json or "
                           "model_index.json; train one with `distillset prior train`.")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path} is not valid JSON ({e}); re-run `distillset prior train` for that folder.") \
            from None
    if meta.get("format") != PRIOR_FORMAT or not isinstance(meta.get("kind"), str) or meta["kind"] not in PRIORS:
        raise DistillError(f"{path} is not a distillset prior description (format {meta.get('format')!r}, kind "
                           f"{meta.get('kind')!r}; expected format {PRIOR_FORMAT!r} and kind one of "
                           f"{PRIORS.names(plugins=False)}).")
    return meta


def from_pretrained(folder: str | Path, kind: str | None = None, num_classes: int | None = None,
                    image_shape: tuple[int, int, int] | None = None, device: str | torch.device = "cpu",
                    cache: bool = True) -> Prior:
    """Load a frozen prior from a local folder and check it fits the task.

    Args:
        folder: a folder written by ``distillset prior train`` (or a diffusers class-conditional LDM folder).
        kind: the expected kind (``ld3m``/``glad``); a folder of another kind is an error.
        num_classes: classes of the task; a prior trained for fewer classes is an error.
        image_shape: ``(C, H, W)`` of the task; a prior rendering another shape is an error.
        device: where the weights go.
        cache: share one loaded instance per (folder, device) within the process (weights are frozen).
    """
    folder = Path(folder)
    meta = read_prior_meta(folder)
    if kind is not None and meta["kind"] != kind:
        raise DistillError(f"{folder} holds a '{meta['kind']}' prior but the '{kind}' parametrization needs a "
                           f"'{kind}' prior; pass a {kind} prior folder (or use parametrization '{meta['kind']}').")
    if num_classes is not None and int(meta["num_classes"]) < num_classes:
        raise DistillError(f"the prior in {folder} was trained for {meta['num_classes']} classes but the task has "
                           f"{num_classes}; train a prior on this data or limit the task with --max_classes.")
    if image_shape is not None and tuple(meta["image_shape"]) != tuple(image_shape):
        raise DistillError(f"the prior in {folder} renders {tuple(meta['image_shape'])} images but the task needs "
                           f"{tuple(image_shape)}; train a prior at this size (--image_size) or set --image_size.")
    key = (str(folder.resolve()), str(torch.device(device)))
    if cache and key in _CACHE:
        return _CACHE[key]
    prior = PRIORS.get(meta["kind"]).load(folder, meta).to(device).eval()
    prior.requires_grad_(False)
    if cache:
        _CACHE[key] = prior
    return prior


def write_prior_meta(folder: str | Path, meta: dict) -> None:
    from distillset.core.io import write_json

    write_json(Path(folder) / "prior.json", {"format": PRIOR_FORMAT, **meta})
