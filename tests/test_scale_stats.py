"""Streaming real-data statistics (squeeze stats): exact against one batch, split + merge, resume, wrong model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from distillset.core.data import Source
from distillset.core.errors import DistillError
from distillset.core.runtime import Runtime
from distillset.squeeze.checkpoint import BackboneConfig, load_teacher, save_backbone
from distillset.squeeze.models import create_model
from distillset.squeeze.statistics import FeatureStats, Moments, StatsConfig, batches, conv_layers, load_statistics, run

CIFAR = "npz:tests/assets/cifar10_small.npz"
CPU = Runtime(None, 0, 1, torch.device("cpu"))


def make_teacher(folder: Path, arch: str = "convnet3_bn", num_classes: int = 10, in_chans: int = 3,
                 img_size: int = 32, seed: int = 0, calibrate: torch.Tensor | None = None, **kw) -> str:
    """A randomly initialised BN backbone saved as a squeeze folder (statistics do not need a trained model).

    BatchNorm running statistics come from ``calibrate`` (uint8 real images, as a trained teacher's would) or noise.
    """
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, in_chans, img_size, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass gives the batch's statistics
    model.train()
    with torch.no_grad():
        x = calibrate.float() / 255 if calibrate is not None else torch.rand(64, in_chans, img_size, img_size)
        model((x - 0.5) / 0.25)
    model.eval()
    cfg = BackboneConfig(arch, num_classes, in_chans, img_size, [0.5] * in_chans, [0.25] * in_chans,
                         [str(i) for i in range(num_classes)], kw, "test")
    save_backbone(folder, model, cfg)
    return str(folder)


def direct_stats(teacher, images: torch.Tensor, labels: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """Statistics of all images in one forward pass, computed the obvious way (float64)."""
    outs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: outs.__setitem__(n, o.double()))
               for name, m in conv_layers(teacher.model)]
    with torch.no_grad():
        teacher(images.float() / 255)
    for h in handles:
        h.remove()
    ref = {}
    for name, y in outs.items():
        ref[f"conv/{name}/mean"] = y.mean((0, 2, 3))
        ref[f"conv/{name}/var"] = y.var((0, 2, 3), unbiased=False)
        n, c, h, w = y.shape
        if h % grid == 0:
            cells = y.reshape(n, c, grid, h // grid, grid, w // grid)
            ref[f"patch/{name}/mean"] = cells.mean((0, 3, 5)).reshape(c, -1).t()
            ref[f"patch/{name}/var"] = cells.var((0, 3, 5), unbiased=False).reshape(c, -1).t()
        for k in (0, 3):
            yk = y[labels == k]
            ref[f"class/{name}/mean#{k}"] = yk.mean((0, 2, 3))
            ref[f"class/{name}/var#{k}"] = yk.var((0, 2, 3), unbiased=False)
    return ref


def check_equal(result: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ref
    for key, want in ref.items():
        if "#" in key:
            key, k = key.split("#")
            got = result[key][int(k)]
        else:
            got = result[key]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return make_teacher(tmp_path_factory.mktemp("t") / "teacher", width=16)


def test_streamed_equals_one_batch_and_file_roundtrip(teacher_dir, tmp_path):
    cfg = StatsConfig(teacher=teacher_dir, data=CIFAR, out=str(tmp_path / "s.safetensors"), batch_size=37,
                      patch_grid=4, class_conditional=True, checkpoint_every=0)
    summary = run(cfg, CPU)
    assert summary["num_samples"] == 500
    teacher = load_teacher(teacher_dir)
    train = Source(CIFAR).load("train")
    ref = direct_stats(teacher, train.images, train.labels, 4)
    st = load_statistics(tmp_path / "s.safetensors", teacher)
    check_equal(st.tensors, ref)
    assert st.layers("conv") == sorted(n for n, _ in conv_layers(teacher.model))
    assert st.meta["teacher_sha256"] == teacher.sha256 and st.meta["num_samples"] == "500"


class FakeAllReduce:
    """A sum over threads standing in for torch.distributed.all_reduce (same call order on every 'rank')."""

    def __init__(self, world: int):
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, r: int):
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.slots[r] = t.clone()
            self.barrier.wait()
            out = sum(self.slots)
            self.barrier.wait()
            return out

        return reduce_sum


def test_two_way_split_and_merge_matches_single_pass(teacher_dir):
    teacher = load_teacher(teacher_dir)
    cfg = StatsConfig(teacher=teacher_dir, data=CIFAR, batch_size=64, class_conditional=True)
    source = Source(CIFAR)
    parts = []
    for rank in range(2):
        fs = FeatureStats(teacher, 4, True)
        for x, y in batches(source, cfg, rank, 2):
            fs.add(x.float() / 255, y)
        parts.append(fs)
    assert parts[0].samples + parts[1].samples == 500
    single = FeatureStats(teacher, 4, True)
    for x, y in batches(source, cfg, 0, 1):
        single.add(x.float() / 255, y)
    keys = sorted(single.acc)
    fake = FakeAllReduce(2)
    threads = [threading.Thread(target=p.all_reduce_, args=(fake.for_rank(r), keys)) for r, p in enumerate(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = single.result()
    for p in parts:  # every rank ends with the merged statistics
        got = p.result()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_moments_pairwise_merge_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) * 3 + 1
    a, b = Moments(1, (5,)), Moments(1, (5,))
    z = torch.zeros(1, dtype=torch.long)
    for i in range(0, 170, 17):
        a.update(z.expand(17), 1, x[i:i + 17].reshape(17, 5), torch.zeros(17, 5, dtype=torch.float64))
    b.update(z.expand(130), 1, x[170:], torch.zeros(130, 5, dtype=torch.float64))
    a.merge_(b.n, b.mean, b.m2)
    torch.testing.assert_close(a.mean[0], x.mean(0))
    torch.testing.assert_close(a.var()[0], x.var(0, unbiased=False))


def test_resume_after_interruption_gives_the_same_statistics(teacher_dir, tmp_path, monkeypatch):
    base = {"teacher": teacher_dir, "data": CIFAR, "batch_size": 50, "patch_grid": 2, "checkpoint_every": 2}
    full = run(StatsConfig(**base, out=str(tmp_path / "full.safetensors")), CPU)
    calls = {"n": 0}
    original = FeatureStats.add

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed mid-stream, after the checkpoint of batch 4
        return original(self, *a, **k)

    monkeypatch.setattr(FeatureStats, "add", flaky)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(StatsConfig(**base, out=str(out)), CPU)
    ckpt = out.with_name("resumed.rank0of1.ckpt.safetensors")
    assert ckpt.exists() and not out.exists()
    calls["n"] = 100  # no more failures; count the batches the resumed run still has to process
    summary = run(StatsConfig(**base, out=str(out)), CPU)
    assert calls["n"] - 100 == 10 - 4  # resumed after the 4 checkpointed batches
    assert summary["num_samples"] == full["num_samples"] == 500 and not ckpt.exists()
    teacher = load_teacher(teacher_dir)
    a, b = load_statistics(tmp_path / "full.safetensors", teacher), load_statistics(out, teacher)
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-6)


def test_statistics_of_another_model_are_refused(teacher_dir, tmp_path):
    run(StatsConfig(teacher=teacher_dir, data=CIFAR, out=str(tmp_path / "s.safetensors"), batch_size=250), CPU)
    other = load_teacher(make_teacher(tmp_path / "other", width=16, seed=1))
    with pytest.raises(DistillError, match="another model"):
        load_statistics(tmp_path / "s.safetensors", other)
    with pytest.raises(DistillError, match="squeeze stats"):
        load_statistics(tmp_path / "missing.safetensors", other)
