"""MTT: the TESLA adjoint gives the unrolled gradient in constant graph memory; matching lowers the distance; the
engine writes a complete MTT run with its learned lr."""

from __future__ import annotations

import pytest
import torch

from distillset.core.distilled import load_distilled
from distillset.core.io import load_tensors
from distillset.core.runtime import get_runtime
from distillset.recover.base import get
from distillset.recover.config import RecoverConfig
from distillset.recover.ema import ImageEMA
from distillset.recover.engine import run as recover_run
from tests.trajectory_helpers import SavedTensorMeter, make_ctx, make_syn, shared_experts


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    return shared_experts(tmp_path_factory)


def grads(method: str, tesla: bool, buffer: str, **opts):
    ctx = make_ctx(augment="curriculum_crop", real=None)
    syn = make_syn(ctx)
    obj = get("objective", method).from_options(buffer=buffer, tesla=tesla, **opts)
    obj.setup(ctx)
    if method == "datm":  # labels from the expert, then perturbed so they are not one-hot-like
        obj._initialised = True
        with torch.no_grad():
            obj.soft_labels.copy_(torch.randn(obj.soft_labels.shape, generator=torch.Generator().manual_seed(1)))
    loss = obj.loss(syn, ctx)
    loss.backward()
    out = {"loss": loss.detach(), "images": syn.data.grad, "lr": obj.syn_lr.grad}
    if method == "datm":
        out["labels"] = obj.soft_labels.grad
    return out


@pytest.mark.parametrize("method,opts", [
    ("mtt", {"syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 3, "batch_syn": 8}),
    ("mtt", {"syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 3, "intermediate": True, "loss_clip": 0.5}),
    ("datm", {"syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 3, "current_max_start_epoch": 2, "batch_syn": 12}),
])
def test_tesla_gradient_equals_unrolled_gradient(buffer, method, opts):
    a = grads(method, False, buffer, **opts)
    b = grads(method, True, buffer, **opts)
    assert torch.equal(a["loss"], b["loss"])
    for k in a:
        assert a[k] is not None and float(a[k].abs().max()) > 0, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6 * float(a[k].abs().max()))


def peak_graph_bytes(buffer: str, tesla: bool, steps: int) -> int:
    ctx = make_ctx()
    syn = make_syn(ctx)
    obj = get("objective", "mtt").from_options(buffer=buffer, tesla=tesla, syn_steps=steps, expert_epochs=2,
                                               max_start_epoch=2)
    obj.setup(ctx)
    with SavedTensorMeter() as m:
        obj.loss(syn, ctx).backward()
    return m.peak


def test_tesla_graph_memory_does_not_grow_with_steps(buffer):
    unrolled = [peak_graph_bytes(buffer, False, n) for n in (2, 8)]
    tesla = [peak_graph_bytes(buffer, True, n) for n in (2, 8)]
    assert unrolled[1] > 3 * unrolled[0]  # back-propagating the unroll keeps every step's graph
    assert tesla[1] <= 1.05 * tesla[0]  # the adjoint pass holds one step's graph whatever N
    assert tesla[1] < unrolled[1] / 3


def test_matching_lowers_the_normalised_parameter_distance(buffer):
    ctx = make_ctx()
    syn = make_syn(ctx)  # noise init: far from anything the experts saw
    obj = get("objective", "mtt").from_options(buffer=buffer, syn_steps=6, expert_epochs=2, max_start_epoch=3,
                                               lr_teacher=0.05, lr_lr=1e-3)
    obj.setup(ctx)

    def distance() -> float:
        state = ctx.generator.get_state()
        ctx.generator.manual_seed(123)  # the same experts, start epochs and batches every time
        vals = [float(obj.loss(syn, ctx).detach()) for _ in range(4)]
        ctx.generator.set_state(state)
        return sum(vals) / len(vals)

    before = distance()
    opt = torch.optim.Adam([{"params": [syn.data], "lr": 0.1}] + obj.extra_parameters())
    for _ in range(25):
        opt.zero_grad()
        obj.loss(syn, ctx).backward()
        opt.step()
        syn.project_()
    after = distance()
    assert after < 0.8 * before, (before, after)


def test_engine_runs_mtt_and_saves_the_learned_lr(buffer, tmp_path):
    cfg = RecoverConfig(out=str(tmp_path / "mtt"), data="digits", method="mtt",
                        options={"buffer": buffer, "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 3,
                                 "lr_lr": 1e-3, "ema": 0.5, "tesla": True},
                        param_options={"init": "real"}, augmentation="none", ipc=2, iterations=6, lr=5.0,
                        optimizer="sgd", momentum=0.5, schedule="constant", log_every=2, channels_last=False,
                        autocast="none")
    manifest = recover_run(cfg, get_runtime())
    assert manifest["status"] == "complete" and manifest["num_images"] == 20
    images, _ = load_distilled(tmp_path / "mtt")
    assert images.images.shape == (20, 1, 8, 8)
    params = load_tensors(tmp_path / "mtt" / "params" / "unit-000000.safetensors")
    assert params["lr"].shape == (1,) and float(params["lr"][0]) != pytest.approx(0.01, abs=1e-7)
    assert (tmp_path / "mtt" / "grid.png").exists()


def test_ema_images_are_written_by_the_finalize_hook(buffer):
    """MTT's ema option is the engine's image EMA (updated as each step starts, swapped in before writing)."""
    ctx = make_ctx()
    syn = make_syn(ctx)
    obj = get("objective", "mtt").from_options(buffer=buffer, syn_steps=1, expert_epochs=2, max_start_epoch=2,
                                               ema=0.5)
    obj.setup(ctx)
    ema = ImageEMA(obj.image_ema())
    iterates = []
    for k in range(3):
        with torch.no_grad():
            syn.data.mul_(0.5)  # stand-in for an optimiser step
        iterates.append(syn.data.detach().clone())
        ema.update(syn)  # what the engine does as a step starts
        obj.loss(syn, ctx)
    with torch.no_grad():
        syn.data.mul_(0.5)
    iterates.append(syn.data.detach().clone())
    ema.finalize(syn)
    obj.finalize(syn)
    expected = iterates[0]
    for x in iterates[1:]:
        expected = 0.5 * expected + 0.5 * x
    torch.testing.assert_close(syn.data.detach(), expected)
    assert not torch.allclose(expected, iterates[-1])


def test_sam_expert_step_uses_the_gradient_at_the_perturbed_point():
    from torch import nn

    from distillset.squeeze.trajectories import _sam_grads

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(3, (16,))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    before = [p.detach().clone() for p in model.parameters()]
    g = torch.autograd.grad(loss_fn(), list(model.parameters()))
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    # expected: the gradient at theta + rho * g / ||g||
    with torch.no_grad():
        for p, gi in zip(model.parameters(), g):
            p.add_(0.5 * gi / norm)
    expected = torch.autograd.grad(loss_fn(), list(model.parameters()))
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    loss_fn().backward()
    _sam_grads(model, loss_fn, rho=0.5)
    for p, b, e in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b)  # parameters restored
        torch.testing.assert_close(p.grad, e)
    assert not torch.allclose(expected[0], g[0])


@pytest.mark.parametrize("tesla", [False, True])
def test_a_diverging_student_surfaces_as_a_non_finite_loss(buffer, tmp_path, tesla):
    from distillset.core.errors import DistillError

    cfg = RecoverConfig(out=str(tmp_path / "nan"), data="digits", method="mtt",
                        options={"buffer": buffer, "syn_steps": 6, "expert_epochs": 2, "max_start_epoch": 3,
                                 "lr_teacher": 1e8, "tesla": tesla},
                        param_options={"init": "real"}, augmentation="none", ipc=1, iterations=2, lr=1.0,
                        optimizer="sgd", log_every=1, channels_last=False, autocast="none")
    with pytest.raises(DistillError, match="NaN/inf"):
        recover_run(cfg, get_runtime())
