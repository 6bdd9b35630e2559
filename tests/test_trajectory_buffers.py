"""Expert trajectories: recorded every epoch, resumable, and checked against the model that replays them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillset.core.errors import DistillError
from distillset.core.runtime import get_runtime
from distillset.recover.base import get
from distillset.squeeze.models import create_model
from distillset.squeeze.trajectories import buffer_files, check_buffer_matches, load_buffers, run
from tests.trajectory_helpers import expert_config, make_ctx


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    cfg = expert_config(out)
    summary = run(cfg, get_runtime())
    return cfg, summary


def test_trajectories_are_recorded_every_epoch(experts):
    cfg, summary = experts
    assert summary["trained"] == [0, 1] and summary["num_experts"] == 2
    buf = load_buffers(cfg.out)
    model = buf.build_model()
    p = sum(q.numel() for q in model.parameters())
    assert [t.shape for t in buf.trajectories] == [(cfg.epochs + 1, p)] * 2
    assert buf.meta["arch"] == "convnet" and buf.meta["model_kwargs"] == {"width": 8}
    assert buf.meta["image_shape"] == [1, 8, 8] and buf.meta["num_classes"] == 10 and buf.meta["lr"] == 0.05
    t = buf.trajectories[0]
    steps = (t[1:] - t[:-1]).norm(dim=1)
    assert bool((steps > 0).all())  # a snapshot per epoch, each one after more training
    assert not torch.equal(buf.trajectories[0][0], buf.trajectories[1][0])  # experts start from different inits
    # the experts learned: clearly above chance (10 %) on the held-out digits
    assert summary["test_top1_mean"] > 0.3
    # the recorded final parameters reproduce the expert's accuracy through the flat-parameter model
    from distillset.core.data import Source
    from distillset.squeeze.trajectories import FlatModel

    test = Source("digits").load("test")
    x = (test.images.float() / 255 - torch.tensor(buf.meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(
        buf.meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        acc_end = (FlatModel(model)(t[-1], x).argmax(1) == test.labels).float().mean()
        acc_start = (FlatModel(model)(t[0], x).argmax(1) == test.labels).float().mean()
    assert acc_end > acc_start + 0.2


def test_resume_skips_recorded_experts_and_reproduces_missing_ones(experts, tmp_path):
    cfg, _ = experts
    files = buffer_files(cfg.out)
    before = {f.name: f.stat().st_mtime_ns for f in files}
    first = load_buffers(files[1]).trajectories[0]
    again = run(cfg, get_runtime())
    assert again["skipped"] == [0, 1] and again["trained"] == []
    assert {f.name: f.stat().st_mtime_ns for f in buffer_files(cfg.out)} == before
    # a lost expert is re-recorded identically (seeded per expert), the others are kept
    files[1].unlink()
    third = run(cfg, get_runtime())
    assert third["trained"] == [1] and third["skipped"] == [0]
    assert torch.equal(load_buffers(files[1]).trajectories[0], first)
    # more experts in the same folder: only the new one is trained (num_experts is not part of the fingerprint)
    more = run(dataclasses.replace(cfg, num_experts=3), get_runtime())
    assert more["trained"] == [2] and len(buffer_files(cfg.out)) == 3
    (files[0].parent / "replay_buffer_2.safetensors").unlink()
    with pytest.raises(DistillError, match="another config"):
        run(dataclasses.replace(cfg, lr=0.02), get_runtime())


def test_mismatched_buffers_give_one_line_errors(experts, tmp_path):
    cfg, _ = experts
    buf = load_buffers(cfg.out)
    wider = create_model("convnet", 10, 1, 8, width=16)
    with pytest.raises(DistillError) as e:
        check_buffer_matches(buf, wider, "convnet")
    assert "\n" not in str(e.value) and "parameters" in str(e.value)
    mtt = get("objective", "mtt")
    with pytest.raises(DistillError, match="record trajectories") as e:
        mtt.from_options(buffer=cfg.out, arch="convnet_bn").setup(make_ctx())
    assert "\n" not in str(e.value)
    ctx = make_ctx()
    ctx.image_shape = (3, 32, 32)
    with pytest.raises(DistillError, match="were trained on") as e:
        mtt.from_options(buffer=cfg.out).setup(ctx)
    assert "\n" not in str(e.value)
    with pytest.raises(DistillError, match="holds no"):
        load_buffers(tmp_path)
    with pytest.raises(DistillError, match="does not exist"):
        load_buffers(tmp_path / "missing")
