"""What a training loop needs from its data and how it is measured: per-channel statistics, the in-memory or
streamed training data contract, and top-1 accuracy summed over ranks. Shared by squeeze's in-memory and streamed
paths, expert trajectories and students."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillset.core.data import ChannelMoments, ImageSet
from distillset.core.runtime import Runtime
from distillset.squeeze.inputs import ZCA, InputTransform


def channel_stats(images: torch.Tensor, batch: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images in [0, 1] units, in batches (no float copy of the set)."""
    moments = ChannelMoments()
    for i in range(0, len(images), batch):
        moments.add(images[i:i + batch])
    return moments.result()


@dataclass
class TrainData:
    """What the training loop needs from a source, in memory or streamed."""

    class_names: list[str]
    image_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    num_train: int
    steps: int
    batches: object  # (epoch, generator) -> iterator of (uint8 images, labels) on the device
    evaluate: object  # model -> test top-1


@torch.no_grad()
def batch_accuracy(model, batches, mean, std, device, rt: Runtime | None = None, zca: ZCA | None = None) -> float:
    """Top-1 of ``model`` (raw, normalised input) over ``(uint8 images, labels)`` batches; with several ranks the
    correct/total counts are summed, so each rank passes only its share of the test data."""
    model.eval()
    norm = InputTransform(mean, std, zca).to(device)
    counts = torch.zeros(2, device=device)
    for xb, yb in batches:
        x = norm(xb.to(device).float() / 255)
        counts[0] += (model(x).argmax(1) == yb.to(device)).sum()
        counts[1] += len(yb)
    if rt is not None:
        counts = rt.all_reduce_sum(counts)
    return float(counts[0] / counts[1].clamp_min(1))


def evaluate_model(model, images: ImageSet, mean, std, device, rt: Runtime | None = None, batch: int = 512,
                   zca: ZCA | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (inputs normalised, then whitened when ``zca`` is given), split
    across ranks and summed."""
    rank, world = (rt.rank, rt.world) if rt else (0, 1)
    idx = torch.arange(rank, len(images), world)
    batches = ((images.images[j], images.labels[j]) for j in idx.split(batch))
    return batch_accuracy(model, batches, mean, std, device, rt, zca)
