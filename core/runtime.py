"""The accelerate runtime: one Accelerator per process, rank facts as plain values, logging on the main process.

The same entry points run as a plain command on one CPU and under ``accelerate launch`` on many GPUs; a CPU host
launched with several processes uses gloo (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from distillset.core.errors import DistillError

log = logging.getLogger("distillset")


@dataclass
class Runtime:
    accelerator: object
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def gather_object(self, obj):
        """Objects from every rank, in rank order (a list of length ``world``)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ---------------------------------------------------------------------------------------- experiment tracking

    @property
    def tracking(self) -> bool:
        """Whether ``--report-to`` names a tracker (tensorboard, wandb, mlflow) and one is started."""
        return bool(getattr(self.accelerator, "trackers", None))

    def start_tracking(self, folder: str | os.PathLike, name: str, config: dict | None = None) -> None:
        """Start accelerate's trackers for one stage, writing under ``folder/runs`` (TensorBoard event files, MLflow
        runs; W&B uses its own store); a no-op without ``--report-to``."""
        if not getattr(self.accelerator, "log_with", None):  # no --report-to: accelerate was made without trackers
            return
        self.end_tracking()
        runs = str(Path(folder) / "runs")
        self.accelerator.project_configuration.set_directories(runs)
        self.accelerator.project_configuration.logging_dir = runs
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flatten(config or {}).items()}
        self.accelerator.init_trackers(name, config=flat)

    def log_metrics(self, values: dict, step: int) -> None:
        """Scalars to the stage's trackers (main process; nothing without ``--report-to``)."""
        if self.tracking:
            self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    def end_tracking(self) -> None:
        if self.tracking:
            self.accelerator.end_training()
            self.accelerator.trackers = []

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank (a new tensor on ``t``'s device; ``t`` itself when ``world == 1``).

        The collective runs on the runtime's device (NCCL needs CUDA tensors; gloo takes CPU ones), and the result
        comes back to where ``t`` lives, so callers keep their accumulators on the CPU."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        buf = t.to(self.device, copy=True)  # never sum into the caller's tensor
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)


_RUNTIME: Runtime | None = None
REPORT_TO_ENV = "DISTILLSET_REPORT_TO"  # set by the CLI's --report-to: tensorboard, wandb, mlflow (or none)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get_runtime(mixed_precision: str = "no") -> Runtime:
    """The process's runtime (created once). Fails clearly when a launcher started processes that do not see
    each other (e.g. torchrun on a CPU host without gloo): every one of them would believe it is rank 0."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    report = [t for t in os.environ.get(REPORT_TO_ENV, "").split(",") if t and t != "none"]
    kwargs = {}
    if report:
        from accelerate.utils import ProjectConfiguration

        kwargs = {"log_with": report,
                  "project_config": ProjectConfiguration(project_dir="output", logging_dir="output")}
    try:
        acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)
    except (ValueError, ImportError) as e:  # an unknown tracker or its package missing
        raise DistillError(f"--report-to {','.join(report)}: {str(e).splitlines()[0]} (tensorboard needs `pip install "
                           "tensorboard`, wandb `pip install wandb`, mlflow `pip install mlflow`).") from None
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != expected:
        raise DistillError(f"WORLD_SIZE={expected} but accelerate sees {acc.num_processes} process(es); on a CPU "
                           "host launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`.")
    _RUNTIME = Runtime(acc, acc.process_index, acc.num_processes, acc.device)
    setup_logging(_RUNTIME.is_main)
    return _RUNTIME


LOG_LEVEL_ENV = "DISTILLSET_LOG_LEVEL"  # set by the CLI's -v / -q: DEBUG (losses every --log-every), WARNING


def setup_logging(is_main: bool) -> None:
    """distillset's logger: INFO on the main process (``-v``: DEBUG, ``-q``: WARNING), warnings only elsewhere."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    level = getattr(logging, os.environ.get(LOG_LEVEL_ENV, "INFO").upper(), logging.INFO)
    log.setLevel(level if is_main else max(level, logging.WARNING))


def progress(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0):
    """tqdm on the local main process only (and only when stderr is a terminal or DISTILLSET_PROGRESS=1)."""
    from tqdm.auto import tqdm

    show = enabled and (os.environ.get("DISTILLSET_PROGRESS") == "1" or
                        (os.environ.get("DISTILLSET_PROGRESS") != "0" and os.isatty(2)))
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware runs it fast (CUDA with bf16 support, CPUs with AMX/AVX512-BF16)."""
    if setting in ("no", "none", "fp32", "false"):
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if setting != "auto":
        raise DistillError(f"unknown autocast setting '{setting}'; use auto, bf16, fp16 or none.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


FALLBACK_MEMORY = 16 * 2**30  # when neither the accelerator nor the OS says how much memory is free


def available_memory(device: torch.device | str | None = None) -> tuple[int, str]:
    """Bytes free for tensors on ``device`` and what they are: the accelerator's free memory on CUDA, otherwise the
    OS's available RAM (``/proc/meminfo`` MemAvailable, then ``os.sysconf``), else a fixed 16 GiB."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0]), f"{device} memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "RAM"
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY, "memory (assumed)"
