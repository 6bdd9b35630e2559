"""The ImageNet-1K path without ImageNet: 1,000 synthetic classes as shards, statistics streamed by two gloo
processes, recover split by class range across them, relabel and evaluate; bad shards fail naming shard and key."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks.make_synthetic_1k import make_synthetic
from distillset.core.data import Source
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.core.runtime import Runtime
from tests.procs import free_port
from tests.test_scale_stats import make_teacher

CPU = Runtime(None, 0, 1, torch.device("cpu"))


def _worker(rank: int, world: int, port: int, data: str, teacher: str, out: str) -> None:
    """One gloo process: squeeze stats, then recover (the same entry points as the CLI)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from distillset.core.runtime import get_runtime
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import run as recover_run
    from distillset.squeeze.statistics import StatsConfig
    from distillset.squeeze.statistics import run as stats_run

    rt = get_runtime()
    assert (rt.rank, rt.world) == (rank, world)
    stats_run(StatsConfig(teacher=teacher, data=data, out=f"{out}/stats2.safetensors", batch_size=128,
                          class_conditional=True), rt)
    recover_run(RecoverConfig(out=f"{out}/distilled", data=data, teachers=[teacher], method="sre2l", ipc=2,
                              iterations=3, classes_per_unit=250, autocast="none", lr=0.1), rt)
    rt.wait()
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.fixture(scope="module")
def syn1k(tmp_path_factory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("syn1k")
    make_synthetic(root / "shards", 1000, per_class=2, test_per_class=1, size=8, shard_size=500)
    data = f"wds:{root / 'shards'}"
    calib = Source(data).load("train").images[:256]
    teacher = make_teacher(root / "teacher", "convnet_bn", num_classes=1000, img_size=8, width=8, depth=2,
                           calibrate=calib)
    return data, teacher, root


def test_1k_classes_two_processes_stats_recover_relabel_evaluate(syn1k):
    from torch.multiprocessing import start_processes

    from distillset.core.distilled import shard_path
    from distillset.recover.config import RecoverConfig
    from distillset.recover.engine import Engine, plan_units
    from distillset.relabel.evaluate import EvaluateConfig
    from distillset.relabel.evaluate import run as evaluate_run
    from distillset.relabel.softlabels import RelabelConfig, load_soft_labels
    from distillset.relabel.softlabels import run as relabel_run
    from distillset.squeeze.checkpoint import load_teacher
    from distillset.squeeze.statistics import StatsConfig, load_statistics
    from distillset.squeeze.statistics import run as stats_run

    data, teacher, root = syn1k
    out = root / "run"
    start_processes(_worker, args=(2, free_port(), data, teacher, str(out)), nprocs=2, start_method="spawn")

    # statistics gathered from two processes' halves of the stream == one process over the whole stream
    t = load_teacher(teacher)
    two = load_statistics(out / "stats2.safetensors", t)
    stats_run(StatsConfig(teacher=teacher, data=data, out=str(out / "stats1.safetensors"), batch_size=300,
                          class_conditional=True), CPU)
    one = load_statistics(out / "stats1.safetensors", t)
    assert two.meta["num_samples"] == one.meta["num_samples"] == "2000"
    assert one.tensors["class/features.0/mean"].shape == (1000, 8)
    for k in one.tensors:
        torch.testing.assert_close(two.tensors[k], one.tensors[k], rtol=1e-4, atol=1e-5, msg=k)

    # recover: 4 class-range units over 1,000 classes, two per process; a unit re-made in this process is identical
    images, manifest = load_distilled(out / "distilled")
    assert len(images) == 2000 and manifest["status"] == "complete"
    assert sorted(r["rank"] for r in manifest["runs"][-1]["ranks"]) == [0, 1]
    # two units each on a quiet machine; a rank that starts late (a loaded host) finds the other one took its units
    assert sum(r["done"] for r in manifest["runs"][-1]["ranks"]) == 4
    cfg = RecoverConfig(out=str(root / "unused"), data=data, teachers=[teacher], method="sre2l", ipc=2,
                        iterations=3, classes_per_unit=250, autocast="none", lr=0.1)
    engine = Engine(cfg, CPU)
    unit = plan_units(1000, 2, 250, 0)[3]  # written by rank 1
    syn, _ = engine.optimise(unit)
    assert shard_path(out / "distilled", 3).exists()
    torch.testing.assert_close(syn.images_uint8(), images.images[1500:], atol=1, rtol=0)

    # relabel with 1,000 classes (int16 indices) and evaluate with soft labels on the streamed test split
    res = relabel_run(RelabelConfig(distilled=str(out / "distilled"), epochs=2, topk=5, batch_size=1000,
                                    autocast="none"), CPU)
    soft = load_soft_labels(out / "distilled")
    assert soft.indices.dtype == torch.int16 and soft.values.shape == (2, 2000, 5)
    assert res["bytes_per_image"] == 2 * 5 * (2 + 2)
    metrics = evaluate_run(EvaluateConfig(distilled=str(out / "distilled"), epochs=1, students=1, labels="soft",
                                          baseline=False, batch_size=500), CPU)
    assert metrics["num_classes"] == 1000 and 0.0 <= metrics["summary"][0]["mean"] <= 1.0


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a tar shard, letting ``edit(name, data)`` return new bytes or None to drop the member."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            new = edit(name, data)
            if new is not None:
                ti = tarfile.TarInfo(name)
                ti.size = len(new)
                tar.addfile(ti, io.BytesIO(new))


@pytest.mark.parametrize("damage, message", [
    ("no_label", "a label (.cls)"), ("no_image", "an image (.png"), ("out_of_range", "out of range"),
    ("corrupt", "cannot be decoded"),
])
def test_bad_shards_name_the_shard_and_the_key(tmp_path, damage, message):
    make_synthetic(tmp_path, 20, per_class=2, test_per_class=1, size=8, shard_size=10)
    shard = tmp_path / "train-000002.tar"
    with tarfile.open(shard) as tar:
        victim = next(m.name for m in tar if m.isfile()).split(".")[0]

    def edit(name: str, data: bytes):
        if not name.startswith(victim + "."):
            return data
        ext = name.split(".", 1)[1]
        if damage == "no_label" and ext == "cls" or damage == "no_image" and ext == "png":
            return None
        if damage == "out_of_range" and ext == "cls":
            return b"20"
        if damage == "corrupt" and ext == "png":
            return data[:20]
        return data

    _rewrite(shard, edit)
    with pytest.raises(DistillError) as err:
        list(Source(f"wds:{tmp_path}").stream("train"))
    text = str(err.value)
    assert "train-000002.tar" in text and victim in text and message in text
