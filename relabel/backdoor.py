"""Backdoor measurements of a trained student: clean test accuracy (CTA) and attack success rate (ASR, the share of
triggered non-target test images classified as the target class), Liu et al., NDSS'23."""

from __future__ import annotations

import torch

from distillset.core.backdoor import triggered
from distillset.core.data import ImageSet
from distillset.squeeze.data import evaluate_model
from distillset.squeeze.inputs import ZCA


def backdoor_scores(model: torch.nn.Module, test: ImageSet, triggers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    target: int, mean, std, device, zca: ZCA | None = None) -> dict:
    """``{"cta": top-1 on test, "asr": {name: ASR under that trigger}}`` for triggers ``name -> (pattern, mask)``."""
    out = {"cta": evaluate_model(model, test, mean, std, device, zca=zca), "asr": {}}
    for name, (pattern, mask) in triggers.items():
        out["asr"][name] = evaluate_model(model, triggered(test, pattern, mask, target), mean, std, device, zca=zca)
    return out
