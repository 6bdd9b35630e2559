"""Learning-rate schedules shared by every loop (recover, squeeze, students, prior training)."""

from __future__ import annotations

import math


def cosine(step: int, total: int, warmup: int = 0, zeta: float = 1.0) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then a
    half cosine from 1 down to 0 (SGDR without restarts, as SRe2L, timm and the students' protocol use).

    ``zeta`` > 1 stretches the cosine over ``zeta x total`` steps, so it ends at ``(1 + cos(pi / zeta)) / 2`` instead
    of 0 (EDC's smoothing learning-rate schedule for students on small distilled sets; zeta 2 ends at half the lr)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (zeta * max(1, total - warmup))))


def cosine_ramp(t: float) -> float:
    """A half cosine from 0 up to 1 over ``t`` in [0, 1] (CDA's cosine curriculum milestone)."""
    return 0.5 * (1 - math.cos(math.pi * t))
