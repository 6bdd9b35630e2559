"""Shared helpers of the trajectory tests (tiny experts on scikit-learn digits)."""

from __future__ import annotations

import torch

from distillset.recover.base import Context, get
from distillset.recover.params import PixelSet
from distillset.squeeze.trajectories import TrajectoryConfig

EXPERT_KW = {"data": "digits", "arch": "convnet", "model_kwargs": {"width": 8}, "num_experts": 2, "epochs": 6,
             "batch_size": 64, "lr": 0.05, "augment": "none"}


def expert_config(out) -> TrajectoryConfig:
    return TrajectoryConfig(out=str(out), **EXPERT_KW)


def make_ctx(ipc: int = 2, seed: int = 0, augment: str = "none", real=None) -> Context:
    cls = torch.arange(10).repeat_interleave(ipc)
    return Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(1, 8, 8),
                   generator=torch.Generator().manual_seed(seed), total_steps=100,
                   augment=get("augmentation", augment).from_options(), real=real)


def make_syn(ctx: Context, ipc: int = 2, init: str = "noise") -> PixelSet:
    cls = torch.arange(10).repeat_interleave(ipc)
    idx = torch.arange(ipc).repeat(10)
    return PixelSet.from_options(cls, idx, (1, 8, 8), 0, ctx, init=init)


_CACHE: dict = {}


def shared_experts(tmp_path_factory) -> str:
    """Record the tiny digits experts once per test session; returns their folder."""
    if "experts" not in _CACHE:
        from distillset.core.runtime import get_runtime
        from distillset.squeeze.trajectories import run

        out = tmp_path_factory.mktemp("shared_experts")
        run(expert_config(out), get_runtime())
        _CACHE["experts"] = str(out)
    return _CACHE["experts"]


class SavedTensorMeter:
    """Peak bytes of tensors held by autograd graphs (saved for backward) while the context is active."""

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        import torch

        meter = self

        refs: dict[int, int] = {}

        class Held:  # each storage counted once however many graph nodes save it
            def __init__(self, t):
                self.t, self.key = t, t.untyped_storage().data_ptr()
                refs[self.key] = refs.get(self.key, 0) + 1
                if refs[self.key] == 1:
                    meter.live += t.untyped_storage().nbytes()
                    meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                refs[self.key] -= 1
                if refs[self.key] == 0:
                    del refs[self.key]
                    meter.live -= self.t.untyped_storage().nbytes()

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
