"""The recover stage's config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from distillset.core.config import check_number
from distillset.core.errors import DistillError, unknown_name


@dataclass
class RecoverConfig:
    """Synthesise a distilled set: parametrization x objective x augmentation, optimised per work unit.

    Attributes:
        out: output folder (manifest.json, images/shard-*.tar, latents/, config.yaml, grid.png).
        data: data source spec (real images for init-from-real and for objectives that need real data).
        teachers: teacher specs (a squeeze folder, local-dir:PATH, tv:ARCH=PATH, timm:ARCH=PATH); used in turn.
        method: objective name (see `distillset methods`).
        options: the objective's options (e.g. r_bn; `distillset methods NAME` lists them); checked when the config
            is built.
        parametrization: how images are parametrised (pixel, or a generative latent set).
        param_options: the parametrization's options (e.g. init: real).
        augmentation: differentiable augmentation name.
        aug_options: the augmentation's options (e.g. milestone, schedule).
        ipc: images per class.
        iterations: optimisation steps per work unit.
        lr: learning rate of the synthetic tensors.
        optimizer: adam (SRe2L, betas below), sgd (matching methods; momentum below) or lbfgs (DLG/iDLG gradient
            leakage: each step runs up to 20 L-BFGS iterations with a strong-Wolfe line search, lr the initial step
            scale, one for every tensor).
        betas: Adam betas.
        momentum: SGD momentum.
        schedule: learning-rate schedule: cosine or constant.
        classes_per_unit: classes optimised together in one work unit (0 = all); units are the grain of sharding
            across processes and of resume.
        ipc_per_unit: image indices per unit (0 = all ipc); ipc_per_unit x classes_per_unit images form a batch.
        seed: base seed; every image and unit derives its own seed from it.
        image_size: synthetic image size (default: the teacher's, else the data's).
        autocast: auto (bf16 where the hardware is fast at it), bf16, fp16 or none.
        channels_last: use channels-last memory format for teachers and images.
        compile: always torch.compile the teachers (otherwise see ``compile_min_steps``).
        compile_min_steps: torch.compile the teachers when this process's share of the run holds at least this many
            optimisation steps (iterations x its units); 0 = only with ``compile``. Compiling fuses the BN-statistics
            hooks, normalisation and activations around the convolutions: ResNet-18 (CIFAR stem, batch 100) runs
            ~1.8x faster per step on a 2-core CPU, ConvNet-3 ~3x, for ~1 min of compiling once per process and
            teacher (benchmarks/recover_throughput.py --compile), repaid after ~200 steps. So long runs (ImageNet's
            4000 iterations, G-VBSM's 1000) compile and smoke runs do not. A compile failure warns once and runs eager.
        stream_real: read real images class by class when the source's shards carry a class index (`distillset
            shards` writes one), so memory follows the classes of a unit, not the dataset; false loads the whole
            training split (the same images are picked either way).
        checkpoint_every: save the unit's optimiser state every N steps so a killed run resumes mid-unit (0 = off).
        log_every: log losses every N steps (also where NaN is checked).
        max_classes: use only the first N classes (0 = all), for debugging.
        zca: ZCA-whiten the inputs of the matching objectives' networks: "" (off; an MTT-family run uses its
            experts' whitening when they were recorded with one), "fit" (fit on the training images of --data) or a
            zca.safetensors path. Saved with the distilled set; evaluate applies it to students and test images.
        zca_reg: regularisation added to the covariance eigenvalues when fitting (MTT/kornia: 0.1).
        ema_decay: write an exponential moving average of the synthetic tensors (FTD) with this decay instead of
            the last iterate (0 = off); MTT's ``ema`` option sets the same average.
    """

    out: str = "output/recover"
    data: str = ""
    teachers: list[str] = field(default_factory=list)
    method: str = "sre2l"
    options: dict = field(default_factory=dict)
    parametrization: str = "pixel"
    param_options: dict = field(default_factory=dict)
    augmentation: str = "curriculum_crop"
    aug_options: dict = field(default_factory=dict)
    ipc: int = 10
    iterations: int = 1000
    lr: float = 0.25
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.5, 0.9)
    momentum: float = 0.5
    schedule: str = "cosine"
    classes_per_unit: int = 10
    ipc_per_unit: int = 0
    seed: int = 0
    image_size: int = 0
    autocast: str = "auto"
    channels_last: bool = True
    compile: bool = False
    compile_min_steps: int = 1000
    stream_real: bool = True
    checkpoint_every: int = 0
    log_every: int = 50
    max_classes: int = 0
    zca: str = ""
    zca_reg: float = 0.1
    ema_decay: float = 0.0

    def __post_init__(self):
        if self.ipc < 1:
            raise DistillError(f"ipc must be >= 1, got {self.ipc}.")
        if self.iterations < 0:
            raise DistillError(f"iterations must be >= 0, got {self.iterations}.")
        if self.compile_min_steps < 0:
            raise DistillError(f"compile_min_steps must be >= 0 (0 = compile only with --compile true), got "
                               f"{self.compile_min_steps}.")
        if self.optimizer not in ("adam", "sgd", "lbfgs"):
            raise DistillError(f"unknown optimizer '{self.optimizer}'; use adam, sgd or lbfgs.")
        if self.schedule not in ("cosine", "constant"):
            raise DistillError(f"unknown schedule '{self.schedule}'; use cosine or constant.")
        if self.classes_per_unit < 0 or self.ipc_per_unit < 0:
            raise DistillError("classes_per_unit and ipc_per_unit must be >= 0 (0 = all).")
        if self.zca_reg <= 0:
            raise DistillError(f"zca_reg must be > 0, got {self.zca_reg}.")
        check_number(self.lr, "lr")  # MTT-family pixel learning rates reach 1000 in normalised units
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise DistillError(f"betas must be two numbers in [0, 1) (e.g. 0.5,0.9), got {self.betas}.")
        if not 0 <= self.momentum < 1:
            raise DistillError(f"momentum must be in [0, 1), got {self.momentum}.")
        if min(self.image_size, self.checkpoint_every, self.max_classes) < 0:
            raise DistillError("image_size, checkpoint_every and max_classes must be >= 0 (0 = default/off).")
        if self.log_every < 1:
            raise DistillError(f"log_every must be >= 1, got {self.log_every}.")
        if not 0 <= self.ema_decay < 1:
            raise DistillError(f"ema_decay is a decay in [0, 1), got {self.ema_decay}.")
        for kind, name in (("objective", self.method), ("parametrization", self.parametrization),
                           ("augmentation", self.augmentation)):
            check_plugin_name(kind, name)  # before torch and every plugin module are imported
        self.plugins()

    def plugins(self) -> tuple[tuple[type, Any], tuple[type, Any], tuple[type, Any]]:
        """``(class, Config)`` of the objective, the parametrization and the augmentation, with their options
        validated (done when the config is built, so a bad option fails before any work or any byte is written)."""
        from distillset.recover.base import resolve_options

        return (resolve_options("objective", self.method, self.options),
                resolve_options("parametrization", self.parametrization, self.param_options),
                resolve_options("augmentation", self.augmentation, self.aug_options))


_DECORATOR = re.compile(r'@register_(objective|parametrization|augmentation)\(\s*"([\w.-]+)"')


@lru_cache(maxsize=1)
def declared_names() -> dict[str, frozenset[str]]:
    """The built-in plugin names, read from the plugin modules' sources without importing them (so an unknown name
    is refused in a fraction of a second, before torch loads); ``tests/test_registry.py`` checks that they are the
    registries' own names."""
    root = Path(__file__).parent
    files = [*root.glob("objectives/*.py"), *root.glob("augmentations/*.py"), root / "params.py", root / "latent.py"]
    found: dict[str, set[str]] = {"objective": set(), "parametrization": set(), "augmentation": set()}
    for f in files:
        for kind, name in _DECORATOR.findall(f.read_text(encoding="utf-8")):
            found[kind].add(name)
    return {k: frozenset(v) for k, v in found.items()}


def check_plugin_name(kind: str, name: str) -> None:
    """A name that is neither built in nor declared by an installed plugin package is a one-line error."""
    names = declared_names()[kind]
    if name in names:
        return
    import sys

    base = sys.modules.get("distillset.recover.base")  # registered at run time (a notebook, a test): no import
    if base is not None and base.REGISTRIES[kind].registered(name):
        return
    from importlib.metadata import entry_points

    if any(ep.name == name for ep in entry_points(group=f"distillset.{kind}s")):
        return  # a third-party plugin: the registry imports and checks it
    if kind == "objective":
        from distillset.recover.refinements import hint

        usage = hint(name.lower())
        if usage:
            raise DistillError(usage)
    raise unknown_name(kind, name, sorted(names))


# options that do not change the result: a re-run with other values continues the same run
NON_SEMANTIC = ("out", "log_every", "checkpoint_every", "compile", "compile_min_steps", "stream_real")
