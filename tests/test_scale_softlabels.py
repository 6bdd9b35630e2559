"""Compact soft labels: uint8 per-crop-scaled values round-trip within one quantisation step and are smaller."""

from __future__ import annotations

import pytest
import torch

from distillset.core.errors import DistillError
from distillset.relabel.softlabels import RelabelConfig, SoftLabels, compress, dense_targets, dequantize


def test_uint8_labels_match_fp16_within_a_quantisation_step_and_are_smaller():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 1000, generator=g) * 3, dim=1)
    half, q = compress(probs, 10, "fp16"), compress(probs, 10, "uint8")
    assert q["values"].dtype == torch.uint8 and q["scale"].shape == (64,)
    assert torch.equal(half["indices"], q["indices"])
    vh, vq = half["values"].float(), dequantize(q["values"], q["scale"])
    step = q["scale"].float()[:, None] / 255
    assert ((vh - vq).abs() <= step * 0.51 + 1e-3 * vh).all()
    th, tq = dense_targets(vh, half["indices"], 1000), dense_targets(vq, q["indices"], 1000)
    assert (th - tq).abs().sum(1).max() < 0.05  # total variation of the rebuilt distributions
    meta = {"num_classes": 1000}
    lh = SoftLabels(half["values"][None], half["indices"][None], meta)
    lq = SoftLabels(q["values"][None], q["indices"][None], meta, q["scale"][None])
    assert (lh.bytes_per_image(), lq.bytes_per_image()) == (10 * (2 + 2), 10 * (1 + 2) + 2)
    torch.testing.assert_close(lq.targets(0, torch.arange(64)), tq)
    assert torch.equal(lh.targets(3, torch.arange(5)), th[:5])  # epochs repeat


def test_quantize_option_is_checked():
    with pytest.raises(DistillError, match="quantize"):
        RelabelConfig(quantize="int4")
