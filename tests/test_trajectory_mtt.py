"""MTT: the TESLA adjoint gives the unrolled gradient in constant graph memory; matching lowers the distance; the
engine writes a complete MTT run with its learned lr."""

from __future__ import annotations

import pytest
import torch

from launch.distilled import load_distilled
from launch.io import load_tensors
from launch.runtime import get_runtime
from recover.base import get
from recover.config import RecoverConfig
from recover.engine import run as recover_run
from tests.trajectory_helpers import SavedTensorMeter, make_ctx, make_syn, shared_experts


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    return shared_experts(tmp_path_factory)


def grads(method: str, tesla: bool, buffer: str, **opts):
    ctx = make_ctx(augment="curriculum_crop", real=None)
    syn = make_syn(ctx)
    obj = get("objective", method)(buffer=buffer, tesla=tesla, **opts)
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
    obj = get("objective", "mtt")(buffer=buffer, tesla=tesla, syn_steps=steps, expert_epochs=2, max_start_epoch=2)
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
    obj = get("objective", "mtt")(buffer=buffer, syn_steps=6, expert_epochs=2, max_start_epoch=3, lr_teacher=0.05,
                                  lr_lr=1e-3)
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
