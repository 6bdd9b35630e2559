"""The contracts of the synthesis engine: parametrization x objective x augmentation.

* A :class:`Parametrization` holds the learnable tensors of one work unit's synthetic images and renders them as
  images in ``[0, 1]`` pixel space (``(N, C, H, W)`` float). Teachers normalise internally, so several teachers with
  different mean/std can score the same images.
* An :class:`Objective` scores rendered images; it owns only its mathematics. The loop in :mod:`recover.engine` owns
  the optimiser, the schedule, sharding, checkpoints and writing.
* An :class:`Augmentation` is differentiable; ``sample`` draws parameters from the unit's generator and ``apply``
  uses them, so the same parameters can be applied to a real and a synthetic batch (DSA).

Built-ins register by name with the decorators below (each is :meth:`core.registry.Registry.register`, so an
entry carries its paper and description, and its options schema is the plugin's nested ``Config`` dataclass);
third-party plugins join through the entry-point groups ``distillset.objectives``, ``distillset.parametrizations``
and ``distillset.augmentations``, imported only when a recipe names a plugin that no built-in provides.

Every plugin is built from its typed ``Config``: ``cls(cfg)`` for objectives and augmentations,
``cls(cfg, classes, indices, image_shape, seed, ctx)`` for parametrizations; :func:`resolve_options` turns a recipe's
options mapping into that ``Config`` (unknown or mistyped options are one-line errors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distillset.core.config import from_dict
from distillset.core.errors import DistillError
from distillset.core.registry import Registry

_BUILTINS = ("distillset.recover.builtins",)
OBJECTIVES = Registry("objective", "distillset.objectives", _BUILTINS)
PARAMETRIZATIONS = Registry("parametrization", "distillset.parametrizations", _BUILTINS)
AUGMENTATIONS = Registry("augmentation", "distillset.augmentations", _BUILTINS)
REGISTRIES: dict[str, Registry] = {"objective": OBJECTIVES, "parametrization": PARAMETRIZATIONS,
                                   "augmentation": AUGMENTATIONS}
ENTRY_POINT_GROUPS = {kind: reg.group for kind, reg in REGISTRIES.items()}

register_objective = OBJECTIVES.register
register_parametrization = PARAMETRIZATIONS.register
register_augmentation = AUGMENTATIONS.register


def registry(kind: str) -> dict[str, type]:
    """All registered classes of ``kind`` (built-ins and every installed plugin, which this imports)."""
    return {e.name: e.obj for e in REGISTRIES[kind].entries()}


def get(kind: str, name: str) -> type:
    """The class registered as ``name`` (a plugin of that name is imported only if no built-in has it)."""
    return REGISTRIES[kind].get(name)


def resolve_options(kind: str, name: str, options: dict | None):
    """``(class, Config)`` of plugin ``name`` with ``options`` validated against its ``Config`` (one-line errors)."""
    cls = get(kind, name)
    return cls, from_dict(cls.Config, options, what=f"{kind} '{name}'")


@dataclass
class NoOptions:
    """A plugin without options."""


def _own_config(plugin, cfg):
    if cfg is None:
        return plugin.Config()
    if not isinstance(cfg, plugin.Config):
        raise DistillError(f"{type(plugin).__name__} is built from its {plugin.Config.__qualname__}, got "
                           f"{type(cfg).__name__}; build it as cls(cls.Config(...)).")
    return cfg


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
        autocast_dtype: dtype of model forward passes under autocast (``None``: full precision).
        mean, std: per-channel input normalisation of the networks the objectives build (the teacher's, the experts'
            or the data's; ``None``: 0.5 per channel).
        zca: the run's ZCA whitening (a ``squeeze.inputs.ZCA``) or ``None``.
        ipc: images per class of the whole run (DC's loop defaults depend on it).
        seed: the run's base seed.
        channels_last: the run keeps teachers and images in channels-last memory format.
        first_index: index of the first image of the unit within its class (coreset selection).
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
    mean: list[float] | None = None
    std: list[float] | None = None
    zca: Any = None
    ipc: int = 1
    seed: int = 0
    channels_last: bool = False
    first_index: int = 0
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        c = self.image_shape[0]
        self.mean = [0.5] * c if self.mean is None else list(self.mean)
        self.std = [0.5] * c if self.std is None else list(self.std)

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

    Subclasses set ``self.labels`` (``(N,)`` long hard labels) and implement :meth:`render`. The engine builds one per
    unit as ``cls(cfg, classes, indices, image_shape, seed, ctx)``, ``cfg`` the class's ``Config`` (its options).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    labels: torch.Tensor

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = _own_config(self, cfg)

    @classmethod
    def from_options(cls, classes: torch.Tensor, indices: torch.Tensor, image_shape: tuple[int, int, int], seed: int,
                     ctx: Context, **options: Any) -> Parametrization:
        """Build from option values (validated into :attr:`Config` first), e.g. in tests and notebooks."""
        cfg = from_dict(cls.Config, options, what=f"parametrization '{cls.name}'")
        return cls(cfg, classes, indices, image_shape, seed, ctx)

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
    """One method's loss, built as ``cls(cfg)`` from its nested ``Config`` dataclass (the recipe's ``options``).

    Every method the engine calls is declared here with a default, so a plugin overrides only what it needs.

    Class attributes tell the engine what the objective needs:
        needs_teacher: a trained model (BN inversion, G-VBSM, relabelled methods).
        needs_real: real images by class (DC, DM, MTT, coresets, init from real).
        needs_bn: every teacher must contain BatchNorm (BN inversion).
        joint_classes: the loss couples all classes (MTT trains one student on the whole set), so the whole task is
            one work unit and cannot be split across processes by class.
        selects: a coreset method: :meth:`select` picks real images and no optimisation runs.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = False
    needs_real: ClassVar[bool] = False
    needs_bn: ClassVar[bool] = False
    joint_classes: ClassVar[bool] = False
    selects: ClassVar[bool] = False

    def __init__(self, cfg=None):
        self.cfg = _own_config(self, cfg)

    @classmethod
    def from_options(cls, **options: Any):
        """Build from option values (validated into :attr:`Config` first), e.g. in tests and notebooks."""
        return cls(from_dict(cls.Config, options, what=f"objective '{cls.name}'"))

    def uses_real(self) -> bool:
        """Whether this configured objective reads ``ctx.real`` (default: the class's ``needs_real``; an option may
        turn real data on, as EDC's class-aware statistics do for BN inversion)."""
        return self.needs_real

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

    def real_per_class(self, ipc: int) -> int:
        """Real images every class must have for a run at ``ipc`` (checked before any work): a selection method
        picks ``ipc`` distinct ones, anything else needs one (init from real, per-class real batches)."""
        return ipc if self.selects else 1

    def select_images(self, ctx: Context, ipc: int) -> torch.Tensor:
        """Selection methods: the ``ipc`` uint8 images ``(ipc, C, H, W)`` of the one class in ``ctx.classes``, images
        ``ctx.first_index ..`` of that class. Default: the real images :meth:`select` picks; a method that composes
        images from real data (RDED stitches crops) overrides this instead."""
        idx = self.select(ctx, ipc)
        return ctx.real.uint8(idx)

    def image_ema(self) -> float:
        """Decay of the moving average of the images this method writes by its own options (0 = none); the engine
        keeps the average (its ``ema_decay`` option), so any method can use it (MTT's ``ema`` maps here)."""
        return 0.0

    def finalize(self, syn: Parametrization) -> None:
        """Called once a unit's optimisation is done, before its images are written."""

    def checkpoint_state(self) -> dict:
        """Tensors (nested dicts allowed) to keep in a unit checkpoint, beyond images, optimiser and generator."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what :meth:`checkpoint_state` returned (``{}`` from a checkpoint that holds none)."""

    def final_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors besides the images saved with the distilled set (``params/unit-*.safetensors``)."""
        return {}

    def network(self, ctx: Context) -> nn.Module | None:
        """The network the objective currently trains or matches on (DC's scheduled network), for hooks that act on
        it (DOORPING optimises its trigger there); ``None``: the objective keeps none between steps."""
        return None

    def teardown(self) -> None:
        """Remove hooks and free memory at the end of a unit."""

    def logs(self) -> dict[str, float]:
        """Numbers worth logging from the last :meth:`loss` call (detached floats)."""
        return {}


class StepHook:
    """Code the engine runs beside an objective without changing it (DOORPING's trigger update): given to
    ``engine.run(cfg, hooks=[...])``, recorded in the manifest by :meth:`describe`; every method has a default.

    Per unit the engine calls :meth:`setup` after the objective's, :meth:`after_step` after every optimiser step
    (the images just updated), :meth:`finalize` before the unit's images are written; :meth:`checkpoint_state` is
    kept in the unit checkpoint, so a resumed unit continues with the hook's state of that step.
    """

    def describe(self) -> dict:
        """What the hook does to the run, as plain JSON (a resume with another description is refused)."""
        return {"hook": type(self).__name__}

    def setup(self, ctx: Context) -> None:
        """Prepare for a unit (``ctx.real`` is set)."""

    def after_step(self, syn: Parametrization, objective: Objective, ctx: Context) -> None:
        """Called after every optimiser step of the unit, ``ctx.step`` the step just taken."""

    def checkpoint_state(self) -> dict:
        """Tensors (nested dicts allowed) to keep in a unit checkpoint."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore what :meth:`checkpoint_state` returned (``{}`` from a checkpoint that holds none)."""

    def finalize(self, syn: Parametrization, ctx: Context) -> None:
        """Called once the unit's optimisation is done, before its images are written."""


class Augmentation:
    """A differentiable augmentation, built as ``cls(cfg)``. ``sample`` draws parameters, ``apply`` uses them."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions

    def __init__(self, cfg=None):
        self.cfg = _own_config(self, cfg)

    @classmethod
    def from_options(cls, **options: Any):
        """Build from option values (validated into :attr:`Config` first), e.g. in tests and notebooks."""
        return cls(from_dict(cls.Config, options, what=f"augmentation '{cls.name}'"))

    def sample(self, n: int, ctx: Context) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], ctx), ctx)


class ComposingObjective(Objective):
    """A selection method that composes all ``ipc`` images of a class at once from real data (RDED stitches crops,
    D4M denoises latent prototypes): :meth:`compose` makes them; units take their slices from a one-class cache,
    so memory stays bounded by one class."""

    selects = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def compose(self, c: int, ipc: int, ctx: Context) -> torch.Tensor:
        """All ``ipc`` images of class ``c`` as ``[0, 1]`` floats ``(ipc, C, H, W)``."""
        raise NotImplementedError

    def class_images(self, c: int, ipc: int, ctx: Context) -> torch.Tensor:
        """:meth:`compose`, computed once per (class, ipc, seed) and kept until the next class."""
        key = (c, ipc, ctx.seed)
        if key not in self._cache:
            self._cache = {key: self.compose(c, ipc, ctx)}
        return self._cache[key]

    def select_images(self, ctx: Context, ipc: int) -> torch.Tensor:
        c = int(torch.unique(ctx.classes)[0])
        i0 = ctx.first_index
        images = self.class_images(c, ctx.ipc, ctx)[i0:i0 + ipc]
        return (images * 255).round().to(torch.uint8).cpu()

    def teardown(self) -> None:
        self._cache = {}
