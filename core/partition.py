"""Pure partition and seeding logic: work units, which process takes which units, seeds derived from integers, and
the seeded order of real images. Every function is a pure function of its arguments (never of the number of
processes or workers), so it is unit-tested without processes and results do not depend on how work is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), so seeds are a pure function of (seed, class, index)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def init_order(class_index: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """The indices of class ``c``'s real images in the seeded order init-from-real and the random baseline use."""
    g = torch.Generator().manual_seed(mix_seed(seed, 3, c))
    return class_index[torch.randperm(class_index.numel(), generator=g)]


@dataclass(frozen=True)
class Unit:
    """A block of classes ``[c0, c1)`` x a block of image indices ``[i0, i1)``: the grain of sharding and resume."""

    index: int
    c0: int
    c1: int
    i0: int
    i1: int

    def classes_and_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        cls = torch.arange(self.c0, self.c1).repeat_interleave(self.i1 - self.i0)
        idx = torch.arange(self.i0, self.i1).repeat(self.c1 - self.c0)
        return cls, idx


def plan_units(num_classes: int, ipc: int, classes_per_unit: int, ipc_per_unit: int) -> list[Unit]:
    """Units in class-major order (a pure function of the config, never of the number of processes)."""
    cpu = classes_per_unit or num_classes
    ipu = ipc_per_unit or ipc
    units = []
    for c0 in range(0, num_classes, cpu):
        for i0 in range(0, ipc, ipu):
            units.append(Unit(len(units), c0, min(c0 + cpu, num_classes), i0, min(i0 + ipu, ipc)))
    return units


def units_for_rank(n_units: int, rank: int, world: int) -> range:
    """Contiguous, balanced block of unit indices for ``rank`` (sizes differ by at most one)."""
    base_, extra = divmod(n_units, world)
    start = rank * base_ + min(rank, extra)
    return range(start, start + base_ + (1 if rank < extra else 0))
