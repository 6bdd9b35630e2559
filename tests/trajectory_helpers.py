"""Shared helpers of the trajectory tests (tiny experts on scikit-learn digits)."""

from __future__ import annotations

import torch

from recover.base import Context, get
from recover.params import PixelSet
from squeeze.trajectories import TrajectoryConfig

EXPERT_KW = dict(data="digits", arch="convnet", model_kwargs={"width": 8}, num_experts=2, epochs=6, batch_size=64,
                 lr=0.05, augment="none")


def expert_config(out) -> TrajectoryConfig:
    return TrajectoryConfig(out=str(out), **EXPERT_KW)


def make_ctx(ipc: int = 2, seed: int = 0, augment: str = "none", real=None) -> Context:
    cls = torch.arange(10).repeat_interleave(ipc)
    return Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(1, 8, 8),
                   generator=torch.Generator().manual_seed(seed), total_steps=100,
                   augment=get("augmentation", augment)(), real=real)


def make_syn(ctx: Context, ipc: int = 2, init: str = "noise") -> PixelSet:
    cls = torch.arange(10).repeat_interleave(ipc)
    idx = torch.arange(ipc).repeat(10)
    return PixelSet(cls, idx, (1, 8, 8), 0, ctx, init=init)
