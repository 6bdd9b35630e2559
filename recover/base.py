"""The contracts of the synthesis engine: parametrization x objective x augmentation.

* A :class:`Parametrization` holds the learnable tensors of one work unit's synthetic images and renders them as
  images in ``[0, 1]`` pixel space (``(N, C, H, W)`` float). Teachers normalise internally, so several teachers with
  different mean/std can score the same images.
* An :class:`Objective` scores rendered images; it owns only its mathematics. The loop in :mod:`recover.engine` owns
  the optimiser, the schedule, sharding, checkpoints and writing.
* An :class:`Augmentation` is differentiable; ``sample`` draws parameters from the unit's generator and ``apply``
  uses them, so the same parameters can be applied to a real and a synthetic batch (DSA).

Built-ins register by name with the decorators below; third-party plugins join through the entry-point groups
``distillset.objectives``, ``distillset.parametrizations`` and ``distillset.augmentations`` (the entry point loads
the class; registration happens on import).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distillset.core.errors import DistillError, unknown_name

ENTRY_POINT_GROUPS = {
    "objective": "distillset.objectives",
    "parametrization": "distillset.parametrizations",
    "augmentation": "distillset.augmentations",
}

_REGISTRIES: dict[str, dict[str, type]] = {kind: {} for kind in ENTRY_POINT_GROUPS}
_ENTRY_POINTS_LOADED: set[str] = set()


def _register(kind: str, name: str):
    def deco(cls):
        cls.name = name
        _REGISTRIES[kind][name] = cls
        return cls

    return deco


def register_objective(name: str):
    """Class decorator registering an :class:`Objective` subclass under ``name``."""
    return _register("objective", name)


def register_parametrization(name: str):
    """Class decorator registering a :class:`Parametrization` subclass under ``name``."""
    return _register("parametrization", name)


def register_augmentation(name: str):
    """Class decorator registering an :class:`Augmentation` subclass under ``name``."""
    return _register("augmentation", name)


def _load_entry_points(kind: str) -> None:
    if kind in _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED.add(kind)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUPS[kind]):
        try:
            cls = ep.load()
        except Exception as e:  # a broken third-party plugin must not break the built-ins
            import logging

            logging.getLogger(__name__).warning("could not load %s plugin %s (%s): %s", kind, ep.name, ep.value, e)
            continue
        if ep.name not in _REGISTRIES[kind]:
            _REGISTRIES[kind][ep.name] = cls
            cls.name = getattr(cls, "name", None) or ep.name


def registry(kind: str) -> dict[str, type]:
    """All registered classes of ``kind`` (built-ins + entry points)."""
    import distillset.recover.builtins  # noqa: F401  (registers the built-in plugins)

    _load_entry_points(kind)
    return dict(_REGISTRIES[kind])


def get(kind: str, name: str) -> type:
    reg = registry(kind)
    if name not in reg:
        raise unknown_name(kind, name, list(reg))
    return reg[name]


# ----------------------------------------------------------------------------------------------------------- context


@dataclass
class Context:
    """What an objective may use. One context per work unit; ``step`` advances with the loop.

    Attributes:
        device: where tensors live.
        rank, world: this process and the number of processes.
        unit: index of the work unit (a block of classes x a block of image indices).
        classes: class id of every synthetic image of the unit, ``(N,)`` long on ``device``.
        num_classes: classes of the whole task.
        image_shape: ``(C, H, W)`` of synthetic images.
        step, total_steps: the loop's position.
        generator: CPU generator seeded from (seed, unit); all randomness of a unit draws from it, so results do
            not depend on how units are split across processes.
        teachers: trained models taking ``[0, 1]`` images (normalisation inside), in eval mode.
        real: real training images by class (``RealData``) or ``None``.
        augment: the configured augmentation (callable on a batch).
        options: free-form extras from the engine (e.g. ``autocast`` dtype).
        state: scratch space an objective may keep across steps of a unit.
    """

    device: torch.device
    classes: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int]
    generator: torch.Generator
    total_steps: int = 1
    step: int = 0
    rank: int = 0
    world: int = 1
    unit: int = 0
    teachers: list = field(default_factory=list)
    real: Any = None
    augment: Any = None
    autocast_dtype: torch.dtype | None = None
    options: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction of the unit's steps done, in [0, 1)."""
        return self.step / max(1, self.total_steps)

    def autocast(self):
        """Autocast context for model forward passes (bf16 where configured), a no-op otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) numbers from the unit generator, on ``device``."""
        return torch.rand(*shape, generator=self.generator).to(self.device, non_blocking=True)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.device, non_blocking=True)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.generator).to(self.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------- parametrization


class Parametrization(nn.Module):
    """Learnable tensors of a unit's synthetic images.

    Subclasses set ``self.labels`` (``(N,)`` long hard labels) and implement :meth:`render`.
    """

    name: ClassVar[str] = ""
    labels: torch.Tensor

    def render(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images ``(n, C, H, W)`` in ``[0, 1]`` for ``index`` (all images when ``None``), differentiable."""
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def project_(self) -> None:
        """Called after every optimiser step (e.g. clamp pixels to the valid range)."""

    def step_cache(self) -> contextlib.AbstractContextManager:
        """Context the engine holds around one step's loss: parameters do not change inside it, so a
        parametrization whose rendering is expensive (a generator) may render every image once and serve
        :meth:`render` calls for subsets (DM/DC ask class by class) from that one batch. Default: no cache."""
        return contextlib.nullcontext()

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the distilled set (beyond the images), e.g. latents."""
        return {}

    @torch.no_grad()
    def images_uint8(self) -> torch.Tensor:
        """Final images as ``(N, C, H, W)`` uint8, for lossless PNG."""
        return (self.render().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------------------- objective


class Objective:
    """One method's loss. Options are keyword arguments of ``__init__`` (filled from the recipe's ``options``).

    Class attributes tell the engine what the objective needs:
        needs_teacher: a trained model (BN inversion, G-VBSM, relabelled methods).
        needs_real: real images by class (DC, DM, MTT, coresets, init from real).
        needs_bn: every teacher must contain BatchNorm (BN inversion).
        joint_classes: the loss couples all classes (MTT trains one student on the whole set), so the whole task is
            one work unit and cannot be split across processes by class.
        selects: a coreset method: :meth:`select` picks real images and no optimisation runs.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    needs_real: ClassVar[bool] = False
    needs_bn: ClassVar[bool] = False
    joint_classes: ClassVar[bool] = False
    selects: ClassVar[bool] = False

    def __init__(self, **options: Any):
        if options:
            raise DistillError(f"objective '{self.name}' takes no options {sorted(options)}; remove them from the "
                               "recipe's objective options.")

    def setup(self, ctx: Context) -> None:
        """Prepare once per unit (hooks, statistics, sampled networks). ``ctx.teachers``/``ctx.real`` are set."""

    def loss(self, syn: Parametrization, ctx: Context) -> torch.Tensor:
        """Scalar loss for the current step; may run inner loops."""
        raise NotImplementedError

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable tensors besides the images (MTT's lr, DATM's labels); optimised by the same loop."""
        return []

    def input_reference(self) -> dict | None:
        """How the networks this objective matches were fed, when it comes with them (expert buffers):
        ``{"mean", "std", "zca": a zca.safetensors path or None, "source": where it comes from}``. The engine then
        uses it for the whole run and records it for evaluation; ``None``: the run's own (the teacher's mean/std, or
        0.5/0.5, and the ``zca`` option)."""
        return None

    def select(self, ctx: Context, ipc: int) -> torch.Tensor:
        """Coreset objectives: indices into ``ctx.real`` of the chosen images, ``ipc`` per class of the unit."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Remove hooks and free memory at the end of a unit."""

    def logs(self) -> dict[str, float]:
        """Numbers worth logging from the last :meth:`loss` call (detached floats)."""
        return {}


class Augmentation:
    """A differentiable augmentation. ``sample`` draws parameters, ``apply`` uses them."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any):
        if options:
            raise DistillError(f"augmentation '{self.name}' takes no options {sorted(options)}.")

    def sample(self, n: int, ctx: Context) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], ctx), ctx)
