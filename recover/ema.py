"""An exponential moving average of a unit's synthetic tensors, kept by the engine for any method (FTD's EMA).

The average is updated with the tensors as they are at the start of every step (before that step's update) and once
more at the end; the images written are then the average's, projected to the valid range.
"""

from __future__ import annotations

import torch

from distillset.core.errors import DistillError
from distillset.recover.base import Parametrization


class ImageEMA:
    """Moving average of every parameter of a parametrization.

    Args:
        decay: weight of the old average at each update, in ``[0, 1)`` (0 = off: every method is a no-op).
    """

    def __init__(self, decay: float):
        if not 0 <= decay < 1:
            raise DistillError(f"ema_decay is a decay in [0, 1), got {decay}.")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, syn: Parametrization) -> None:
        if not self.decay:
            return
        params = {n: p.detach() for n, p in syn.named_parameters()}
        if self.shadow is None:
            self.shadow = {n: p.clone() for n, p in params.items()}
            return
        for n, p in params.items():
            self.shadow[n].lerp_(p, 1 - self.decay)

    @torch.no_grad()
    def finalize(self, syn: Parametrization) -> None:
        """Swap the average into ``syn`` (after a last update), so the written images are the average."""
        if not self.decay:
            return
        self.update(syn)
        for n, p in syn.named_parameters():
            p.copy_(self.shadow[n])
        syn.project_()

    def state(self) -> dict:
        return {k: v.cpu() for k, v in self.shadow.items()} if self.shadow is not None else {}

    def load_state(self, state: dict, device: torch.device) -> None:
        if state:
            self.shadow = {k: v.to(device) for k, v in state.items()}
