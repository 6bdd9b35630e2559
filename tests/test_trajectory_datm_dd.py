"""DATM's soft labels start from the expert, are learned and saved; its window grows. DD learns images and step
sizes through the unrolled inner loop."""

from __future__ import annotations

import pytest
import torch

from distillset.core.data import Source
from distillset.core.io import load_tensors
from distillset.core.runtime import get_runtime
from distillset.recover.base import get
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run
from distillset.recover.real import RealData
from tests.trajectory_helpers import make_ctx, make_syn, shared_experts


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    return shared_experts(tmp_path_factory)


@pytest.fixture(scope="module")
def real():
    return RealData(Source("digits").load("train"))


def test_datm_labels_start_from_the_expert_and_replace_misclassified_images(buffer, real):
    ctx = make_ctx(real=real)
    syn = make_syn(ctx, init="noise")  # noise: the expert gets most of these wrong
    obj = get("objective", "datm").from_options(buffer=buffer, syn_steps=3, expert_epochs=2, max_start_epoch=4,
                                   current_max_start_epoch=2, label_epoch=6)
    obj.setup(ctx)
    net = obj._label_net(ctx)
    with torch.no_grad():
        wrong_before = int((net(syn.render()).argmax(1) != syn.labels).sum())
    assert wrong_before > 0
    obj.loss(syn, ctx)
    with torch.no_grad():
        logits = net(syn.render())
    # the images the expert got wrong were swapped for real images it classifies correctly
    assert int((logits.argmax(1) != syn.labels).sum()) < wrong_before
    assert obj.logs()["label_agree"] > 0.9
    # the labels are the expert's logits on the (final) initial images
    torch.testing.assert_close(obj.soft_labels.detach(), logits)
    # the window's upper bound grows from current_max_start_epoch to max_start_epoch
    ctx.step = 0
    assert obj.start_window(ctx) == (0, 2)
    ctx.step = ctx.total_steps - 1
    assert obj.start_window(ctx) == (0, 4)


def test_datm_soft_labels_are_learned_and_saved(buffer, tmp_path):
    cfg = RecoverConfig(out=str(tmp_path / "datm"), data="digits", method="datm",
                        options={"buffer": buffer, "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 4,
                                 "current_max_start_epoch": 2, "lr_y": 5.0, "lr_lr": 1e-3},
                        param_options={"init": "real"}, augmentation="none", ipc=2, iterations=5, lr=5.0,
                        optimizer="sgd", momentum=0.5, schedule="constant", log_every=5, channels_last=False,
                        autocast="none")
    recover_run(cfg, get_runtime())
    params = load_tensors(tmp_path / "datm" / "params" / "unit-000000.safetensors")
    assert params["soft_labels"].shape == (20, 10) and params["lr"].shape == (1,)
    # recompute the initial labels the way DATM does and check that optimisation moved them
    obj = get("objective", "datm").from_options(**cfg.options)
    ctx = make_ctx(real=RealData(Source("digits").load("train")))
    obj.setup(ctx)
    syn = get("parametrization", "pixel").from_options(ctx.classes, torch.arange(2).repeat(10), (1, 8, 8), 0, ctx, init="real")
    obj._initialise(syn, ctx)
    moved = (params["soft_labels"] - obj.soft_labels.detach()).abs().max()
    assert float(moved) > 1e-3


def test_dd_learns_images_and_step_sizes(real):
    ctx = make_ctx(real=real)
    syn = make_syn(ctx, ipc=1, init="noise")
    ctx.classes = syn.labels
    obj = get("objective", "dd").from_options(model_kwargs={"width": 8}, inner_steps=4, lr_init=0.2, lr_lr=0.05,
                                 real_batch=200)
    obj.setup(ctx)

    def score() -> float:
        state = ctx.generator.get_state()
        ctx.generator.manual_seed(7)  # the same random inits and real batches every time
        v = sum(float(obj.loss(syn, ctx).detach()) for _ in range(3)) / 3
        ctx.generator.set_state(state)
        return v

    before = score()
    lr0 = obj.final_state()["lrs"].clone()
    opt = torch.optim.Adam([{"params": [syn.data], "lr": 0.1}] + obj.extra_parameters())
    for _ in range(30):
        opt.zero_grad()
        obj.loss(syn, ctx).backward()
        opt.step()
        syn.project_()
    after = score()
    assert after < before - 0.25, (before, after)
    assert float((obj.final_state()["lrs"] - lr0).abs().max()) > 1e-3


def test_datm_resumes_mid_run_to_the_same_result(buffer, tmp_path, monkeypatch):
    from distillset.core.distilled import load_distilled
    from distillset.recover.objectives.datm import DATM

    def cfg(out):
        return RecoverConfig(out=str(out), data="digits", method="datm",
                             options={"buffer": buffer, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 4,
                                      "current_max_start_epoch": 2, "lr_y": 5.0, "lr_lr": 1e-3, "ema": 0.5},
                             param_options={"init": "real"}, augmentation="none", ipc=1, iterations=4, lr=5.0,
                             optimizer="sgd", momentum=0.5, schedule="constant", log_every=1, checkpoint_every=2,
                             channels_last=False, autocast="none")

    recover_run(cfg(tmp_path / "straight"), get_runtime())
    original = DATM.loss

    def crash_at_3(self, syn, ctx):
        if ctx.step == 3:
            raise KeyboardInterrupt
        return original(self, syn, ctx)

    monkeypatch.setattr(DATM, "loss", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        recover_run(cfg(tmp_path / "resumed"), get_runtime())
    assert (tmp_path / "resumed" / "state" / "unit-000000.pt").exists()
    monkeypatch.setattr(DATM, "loss", original)
    recover_run(cfg(tmp_path / "resumed"), get_runtime())
    a, _ = load_distilled(tmp_path / "straight")
    b, _ = load_distilled(tmp_path / "resumed")
    assert torch.equal(a.images, b.images)
    pa = load_tensors(tmp_path / "straight" / "params" / "unit-000000.safetensors")
    pb = load_tensors(tmp_path / "resumed" / "params" / "unit-000000.safetensors")
    for k in ("lr", "soft_labels"):
        torch.testing.assert_close(pa[k], pb[k])
