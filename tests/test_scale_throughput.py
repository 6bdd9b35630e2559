"""Recover hot-loop speedups keep the numbers: cached bf16 teacher weights and the promoted channel moments."""

from __future__ import annotations

import os

import pytest
import torch

from distillset.core.errors import DistillError
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


def test_fallback_compiled_runs_eager_when_the_compiler_fails(monkeypatch, caplog):
    """A compiler failure (here inductor's, as when there is no C++ compiler) warns once and runs eager from then
    on; an error of the model's own code is not swallowed."""
    import torch._dynamo.exc

    from distillset.core.compiling import FallbackCompiled

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(torch, "compile", lambda module, **kw: broken)
    net = torch.nn.Linear(4, 2)
    wrapped = FallbackCompiled(net)
    x = torch.randn(3, 4)
    with caplog.at_level("WARNING"):
        assert torch.equal(wrapped(x), net(x)) and torch.equal(wrapped(x), net(x))
    assert calls == [1] and not wrapped.compiled
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
    assert list(wrapped.state_dict()) == ["_orig_mod.weight", "_orig_mod.bias"]  # as torch.compile'd modules

    def model_error(*args, **kwargs):
        raise ValueError("shapes do not match")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: model_error)
    wrapped = FallbackCompiled(net)
    with pytest.raises(ValueError, match="shapes"):
        wrapped(x)
    assert wrapped.compiled


def test_recover_compiles_teachers_only_for_runs_long_enough_to_repay_it(digits_teacher, tmp_path):
    from distillset.core.runtime import Runtime
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import Engine

    def compiled(**kw):
        cfg = RecoverConfig(out=str(tmp_path / "out"), teachers=[str(digits_teacher)], method="sre2l", ipc=2,
                            **{"classes_per_unit": 5, **kw})  # 2 units of 5 classes
        engine = Engine(cfg, Runtime(None, 0, 1, torch.device("cpu")))
        t = engine.teachers[0]
        assert not hasattr(t.model, "_orig_mod")  # the raw network: module names as in statistics files
        return engine.compiles_teachers(), "_compiled" in t.__dict__

    assert compiled(iterations=999, compile_min_steps=2000) == (False, False)
    assert compiled(iterations=1000, compile_min_steps=2000) == (True, True)  # 2 units x 1000 steps
    assert compiled(iterations=1000, compile_min_steps=2000, classes_per_unit=0) == (False, False)  # one unit
    assert compiled(iterations=5000, compile_min_steps=0) == (False, False)
    assert compiled(iterations=10, compile=True) == (True, True)
    with pytest.raises(DistillError, match="compile_min_steps"):
        RecoverConfig(out=str(tmp_path), teachers=[str(digits_teacher)], compile_min_steps=-1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTILLSET_COMPILE_TESTS") != "1",
                    reason="compiles with inductor: ~20-100 s on a 2-core CPU; DISTILLSET_COMPILE_TESTS=1 runs it")
def test_compiled_teacher_recovers_the_same_images(digits_teacher, tmp_path):
    """The real compiled path: SRe2L with the teacher compiled (BN hooks inside the graph) gives the eager loss
    and images up to bf16 rounding."""
    from distillset.core.runtime import Runtime
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import Engine, plan_units

    out = {}
    for flag in (False, True):
        cfg = RecoverConfig(out=str(tmp_path / str(flag)), teachers=[str(digits_teacher)], method="sre2l", ipc=2,
                            iterations=20, classes_per_unit=0, compile=flag, log_every=20)
        engine = Engine(cfg, Runtime(None, 0, 1, torch.device("cpu")))
        syn, logs = engine.optimise(plan_units(10, 2, 0, 0)[0])
        out[flag] = syn.render().detach(), logs["loss"]
        assert engine.teachers[0].compiled == flag
    assert abs(out[True][1] - out[False][1]) <= 0.02 * abs(out[False][1])
    assert (out[True][0] - out[False][0]).abs().mean() < 0.02
