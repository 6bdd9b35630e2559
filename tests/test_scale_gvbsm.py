"""G-VBSM recover: two teachers in turn, real-data conv/patch statistics; teacher-set checks."""

from __future__ import annotations

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.core.runtime import Runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import Engine, plan_units
from distillset.squeeze.statistics import StatsConfig
from distillset.squeeze.statistics import run as stats_run
from tests.test_scale_stats import CIFAR, make_teacher

CPU = Runtime(None, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gv")
    real = Source(CIFAR).load("train").images
    a = make_teacher(root / "a", "convnet3_bn", width=16, calibrate=real)
    b = make_teacher(root / "b", "convnet2_bn", width=12, seed=3, calibrate=real)
    for t in (a, b):
        stats_run(StatsConfig(teacher=t, data=CIFAR, batch_size=250, patch_grid=4, class_conditional=True), CPU)
    return a, b


def _engine(tmp_path, teachers, **opts):
    cfg = RecoverConfig(out=str(tmp_path / "out"), teachers=list(teachers), method="gvbsm", options=opts, ipc=2,
                        iterations=40, classes_per_unit=4, max_classes=4, autocast="none", log_every=10, lr=0.1,
                        augmentation="none")
    return Engine(cfg, CPU)


def _terms(engine, unit, syn):
    """Each term of the objective for the images of ``syn``, per teacher."""
    ctx = engine.context(unit)
    obj = engine.objective
    obj.setup(ctx)
    out = []
    with torch.no_grad():
        for k in range(len(engine.teachers)):
            ctx.step = k
            obj.loss(syn, ctx)
            out.append(obj.logs())
    obj.teardown()
    return out


def _run(tmp_path, teachers, **opts):
    engine = _engine(tmp_path, teachers, **opts)
    unit = plan_units(engine.num_classes, 2, 4, 0)[0]
    cls, idx = unit.classes_and_indices()
    start = engine.param_cls(engine.param_cfg, cls, idx, engine.image_shape, 0, engine.context(unit))
    before = _terms(engine, unit, start)
    syn, logs = engine.optimise(unit)
    return before, _terms(engine, unit, syn), logs


def test_conv_and_patch_matching_moves_images_to_real_statistics_of_every_teacher(tmp_path, teachers):
    before, after, logs = _run(tmp_path, teachers, ce_weight=0.0, r_bn=0.0)
    assert set(logs) >= {"loss", "ce", "bn", "conv", "patch"}
    for b, a in zip(before, after):  # teachers used in turn: every teacher's distances fell by half or more
        assert a["conv"] < 0.5 * b["conv"] and a["patch"] < 0.5 * b["patch"], (b, a)


def test_gvbsm_matches_real_statistics_better_than_sre2l_at_equal_budget(tmp_path, teachers):
    _, gv, _ = _run(tmp_path / "g", teachers)
    _, sre2l, _ = _run(tmp_path / "s", teachers, r_conv=0.0, r_patch=0.0)  # the same loop without G-VBSM's terms
    for g, s in zip(gv, sre2l):
        assert g["conv"] < 0.9 * s["conv"] and g["patch"] < 0.9 * s["patch"], (g, s)
        assert g["ce"] < 1.0  # still classified as its class


def test_gvbsm_without_statistics_says_how_to_make_them(tmp_path):
    t = make_teacher(tmp_path / "nostats", width=8)
    engine = _engine(tmp_path, [t])
    unit = plan_units(engine.num_classes, 2, 4, 0)[0]
    with pytest.raises(DistillError, match="squeeze stats"):
        engine.optimise(unit)


def test_teacher_sets_must_agree_on_classes_and_resolution(tmp_path, teachers):
    ten, twelve = teachers[0], make_teacher(tmp_path / "c12", width=8, num_classes=12)
    with pytest.raises(DistillError, match="number of classes"):
        _engine(tmp_path, [ten, twelve])
    small = make_teacher(tmp_path / "px16", width=8, img_size=16)
    with pytest.raises(DistillError, match="one resolution"):
        _engine(tmp_path, [ten, small])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_moments_value_and_gradient_equal_var_mean(layout):
    from distillset.recover.objectives.bn_inversion import channel_moments

    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 3).contiguous(memory_format=layout).requires_grad_(True)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    mean, var = channel_moments(x, torch.ones(3))
    v_ref, m_ref = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close((mean, var), (m_ref, v_ref))
    g = torch.autograd.grad((mean.sin() + w * var).sum(), x)[0]
    g_ref = torch.autograd.grad((m_ref.sin() + w * v_ref).sum(), x)[0]
    torch.testing.assert_close(g, g_ref)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)  # bf16 input: fp32 statistics, bf16 gradient
    mb, vb = channel_moments(xb)
    assert mb.dtype == torch.float32 and torch.allclose(mb.double(), m_ref, atol=0.05)
    (mb.sum() + vb.sum()).backward()
    assert xb.grad.dtype == torch.bfloat16
