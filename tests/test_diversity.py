"""Within-class diversity: zero for a collapsed class, larger for a spread one, per class and in features too."""

from __future__ import annotations

import torch

from distillset.core.data import ImageSet
from distillset.relabel.diversity import mean_pairwise_distance, within_class_diversity


def test_mean_pairwise_distance_is_the_pair_average():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert abs(mean_pairwise_distance(x) - (5 + 5 + 0) / 3) < 1e-9
    assert mean_pairwise_distance(x[:1]) == 0.0
    one = ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    assert within_class_diversity(one) == {}  # IPC 1: undefined, not zero


def test_collapsed_set_scores_zero_and_spread_set_more(digits_teacher):
    from distillset.squeeze.checkpoint import load_teacher

    g = torch.Generator().manual_seed(0)
    spread = torch.randint(0, 256, (20, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(20) % 2
    collapsed = spread[labels].clone()  # class c holds 10 copies of one image
    teacher = load_teacher(str(digits_teacher))
    a = within_class_diversity(ImageSet(collapsed, labels, ["a", "b"]), teacher)
    b = within_class_diversity(ImageSet(spread, labels, ["a", "b"]), teacher)
    assert a["pixel"] == 0.0 and a["feature"] < 1e-4
    assert b["pixel"] > 0.2 and b["feature"] > 0.1


def test_unknown_evaluator_is_refused_before_any_work():
    import pytest

    from distillset.core.errors import DistillError
    from distillset.relabel.evaluate import EvaluateConfig

    with pytest.raises(DistillError, match="unknown evaluator 'diversty'. Did you mean 'diversity'"):
        EvaluateConfig(evaluators=["diversty"])
