"""EDC's soft category-aware BN matching (``sre2l`` option ``class_aware``): the per-class real statistics are the
moments of the teacher's BN inputs on that class, the class-wise term tells a class's own images from another's, and
the option runs through the engine (and asks for --data)."""

from __future__ import annotations

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.core.partition import init_order
from distillset.recover.base import Context, Parametrization, get
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run
from distillset.recover.objectives.bn_inversion import bn_layers
from distillset.recover.real import RealData
from distillset.squeeze.checkpoint import load_teacher


class Fixed(Parametrization):
    """Given images as the synthetic set (no learnable tensors): to score chosen images."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def render(self, positions=None):
        return self.x if positions is None else self.x[positions]


@pytest.fixture(scope="module")
def setup(digits_teacher):
    teacher = load_teacher(str(digits_teacher))
    real = RealData(Source("digits").load("train"))
    return teacher, real


def _ctx(teacher, real, classes):
    return Context(device=torch.device("cpu"), classes=torch.tensor(classes), num_classes=10, image_shape=(1, 8, 8),
                   generator=torch.Generator().manual_seed(0), real=real, teachers=[teacher], ipc=1, seed=3,
                   augment=lambda x, ctx: x)


def test_class_statistics_are_the_moments_of_the_class(setup):
    teacher, real = setup
    obj = get("objective", "sre2l").from_options(class_aware=0.5, class_stats_images=100)
    assert obj.uses_real() and not get("objective", "sre2l").from_options().uses_real()
    obj.setup(_ctx(teacher, real, [2, 7]))
    layer = bn_layers(teacher.model)[1]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    idx = init_order(real.index[7], 7, 3)[:100]
    with torch.no_grad():
        teacher(real.get(idx))
    handle.remove()
    x = seen[0].transpose(0, 1).flatten(1)
    mean, var = obj.hooks[0][1].class_stats[7]
    assert torch.allclose(mean, x.mean(1), atol=1e-4) and torch.allclose(var, x.var(1, unbiased=False), atol=1e-4)
    obj.teardown()


def test_pooled_chunks_equal_one_pass(setup):
    teacher, real = setup
    one = get("objective", "sre2l").from_options(class_aware=1.0, class_stats_images=300)  # 2 chunks of <= 256
    one.setup(_ctx(teacher, real, [4]))
    m2, v2 = one.hooks[0][0].class_stats[4]
    layer = bn_layers(teacher.model)[0]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        teacher(real.get(init_order(real.index[4], 4, 3)[:300]))
    handle.remove()
    x = seen[0].transpose(0, 1).flatten(1)
    assert torch.allclose(m2, x.mean(1), atol=1e-4) and torch.allclose(v2, x.var(1, unbiased=False), atol=1e-3)
    one.teardown()


def test_class_term_prefers_the_class_own_images(setup):
    teacher, real = setup
    obj = get("objective", "sre2l").from_options(class_aware=1.0, r_bn=1.0, ce_weight=0.0)
    ctx = _ctx(teacher, real, [0] * 16)
    obj.setup(ctx)
    g = torch.Generator().manual_seed(1)
    own = obj.loss(Fixed(real.sample(0, 16, g), torch.zeros(16, dtype=torch.long)), ctx)
    other = obj.loss(Fixed(real.sample(1, 16, g), torch.zeros(16, dtype=torch.long)), ctx)
    assert obj.logs()["bn_class"] > 0 and float(own) < 0.5 * float(other)
    obj.teardown()


def test_engine_runs_class_aware_recover_and_needs_data(digits_teacher, tmp_path):
    common = {"teachers": [str(digits_teacher)], "method": "sre2l", "ipc": 1, "iterations": 3, "autocast": "none",
              "options": {"class_aware": 0.5}}
    m = run(RecoverConfig(out=str(tmp_path / "a"), data="digits", **common))
    assert m["status"] == "complete"
    with pytest.raises(DistillError, match="needs real data"):
        run(RecoverConfig(out=str(tmp_path / "b"), **common))
    with pytest.raises(DistillError, match="weight in \\[0, 1\\]"):
        RecoverConfig(out=str(tmp_path / "c"), data="digits", **{**common, "options": {"class_aware": 2}})


def test_smoothing_lr_schedule_stretches_the_students_cosine():
    """EDC's smoothing schedule: the sre2l cosine over zeta x the steps ends at (1 + cos(pi / zeta)) / 2 of the lr."""
    import math

    from distillset.core.schedule import cosine
    from distillset.relabel.evaluate import EvaluateConfig
    from distillset.relabel.student import StudentSpec, check_spec, optimizer

    assert cosine(0, 100, zeta=2) == 1.0 and cosine(100, 100) == 0.0
    assert math.isclose(cosine(100, 100, zeta=2), 0.5) and math.isclose(cosine(50, 100, zeta=2), 0.5 * (1 + 2 ** -0.5))
    for zeta, last in ((1.0, 0.0), (2.0, 0.5), (4.0, 0.5 * (1 + math.cos(math.pi / 4)))):
        w = torch.nn.Parameter(torch.zeros(3))
        opt, sched = optimizer([w], StudentSpec("convnet", {}, 10, lr=1e-3, lr_zeta=zeta), 40, "cpu")
        for _ in range(40):
            opt.step()
            sched.step()
        assert math.isclose(opt.param_groups[0]["lr"], 1e-3 * last, abs_tol=1e-12), zeta
    with pytest.raises(DistillError, match="lr_zeta must be in"):
        EvaluateConfig(lr_zeta=0.5)
    with pytest.raises(DistillError, match="steps its lr down at half"):
        EvaluateConfig(lr_zeta=2, protocol="matching")
    with pytest.raises(DistillError, match="steps its lr down at half"):
        check_spec(StudentSpec("convnet", {}, 10, protocol="plain", lr_zeta=2), None)
