"""Recover hot-loop speedups keep the numbers: cached bf16 teacher weights and the promoted channel moments."""

from __future__ import annotations

import torch

from distillset.recover.objectives.bn_inversion import channel_moments
from distillset.squeeze.checkpoint import BackboneConfig, Teacher
from distillset.squeeze.models import create_model


def _teacher(arch: str = "resnet18_cifar") -> Teacher:
    torch.manual_seed(0)
    model = create_model(arch, 10, 3, 32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    t = Teacher(model, BackboneConfig(arch, 10, 3, 32, [0.5] * 3, [0.25] * 3))
    model.to(memory_format=torch.channels_last)
    t.channels_last = True
    return t


def _plain(t: Teacher, x: torch.Tensor) -> torch.Tensor:
    return t.model(t.normalize(x).contiguous(memory_format=torch.channels_last))


def test_cached_bf16_weights_match_autocast_exactly_and_follow_weight_changes():
    t = _teacher()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = t(x)
        b = _plain(t, x)
    assert "_low_cache" in t.__dict__  # the cached path was taken
    assert torch.equal(a, b)
    ga, = torch.autograd.grad(a.float().square().sum(), x)
    gb, = torch.autograd.grad(b.float().square().sum(), x)
    assert torch.equal(ga, gb)
    with torch.no_grad():  # an in-place update of a weight must not be served from a stale cache
        t.model.fc.weight.mul_(-2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = t(x)
        d = _plain(t, x)
    assert torch.equal(c, d) and not torch.equal(a, c)
    assert torch.equal(t(x), _plain(t, x))  # fp32 outside autocast: the original weights, no cache


def test_trainable_teacher_is_not_cached():
    t = _teacher("convnet3_bn")
    t.model.classifier.weight.requires_grad_(True)
    assert t._low_precision_weights(torch.bfloat16) == {}


def test_channel_moments_of_bf16_match_fp32_var_mean_both_layouts():
    torch.manual_seed(1)
    x32 = torch.randn(6, 16, 8, 8) * 3 + 5
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = x32.to(torch.bfloat16).contiguous(memory_format=fmt).requires_grad_(True)
        mean, var = channel_moments(x, torch.full((16,), 4.0))
        ref_var, ref_mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), correction=0)
        assert mean.dtype == torch.float32
        torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-4)
        g, = torch.autograd.grad((mean.sum() + var.sum()), x)
        xf = x.detach().float().requires_grad_(True)
        v2, m2 = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        g2, = torch.autograd.grad(m2.sum() + v2.sum(), xf)
        torch.testing.assert_close(g.float(), g2, rtol=2e-2, atol=2e-3)
