"""Per-class streaming: shards carry a class index, recover reads only the classes it needs, and picks the very
images an in-memory load would (same positions), so results are identical either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillset.core.classindex import ClassIndex
from distillset.core.data import Source, WdsShards
from distillset.core.distilled import load_distilled
from distillset.core.errors import DistillError
from distillset.core.runtime import Runtime
from distillset.launch.shards import ShardsConfig, ShardsIndexConfig, run_index
from distillset.launch.shards import run as shards
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import Engine, run
from distillset.recover.real import StreamedRealData
from tests.conftest import CIFAR

CPU = Runtime(None, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    """The CIFAR fixture as shards in source order (shuffle off) and shuffled, both indexed."""
    root = tmp_path_factory.mktemp("wds")
    shards(ShardsConfig(data=CIFAR, out=str(root / "plain"), maxcount=70, shuffle=False), CPU)
    shards(ShardsConfig(data=CIFAR, out=str(root / "mixed"), maxcount=70, shuffle=True, seed=3), CPU)
    return root


def _dm(out, data, **kw):
    return RecoverConfig(out=str(out), data=data, method="dm", ipc=2, iterations=3, parametrization="pixel",
                         param_options={"init": "real"}, augmentation="none", optimizer="sgd", lr=1.0,
                         schedule="constant", classes_per_unit=5, options={"width": 16, "batch_real": 8},
                         autocast="none", **kw)


def test_the_index_gives_each_class_in_load_order(cifar_shards):
    shards_ = WdsShards(str(cifar_shards / "mixed"))
    loaded = shards_.load("train")
    index = ClassIndex(shards_, "train")
    assert len(index) == len(loaded) and index.counts().tolist() == loaded.class_counts().tolist()
    for c in (0, 7):
        pos = index.positions(c)
        assert torch.equal(pos, torch.nonzero(loaded.labels == c).flatten())
        assert torch.equal(index.read(pos.flip(0)), loaded.images[pos.flip(0)])  # any order, exact pixels
    info = json.loads((cifar_shards / "mixed" / "_info.json").read_text())["splits"]["train"]
    from distillset.squeeze.data import channel_stats

    mean, std = channel_stats(loaded.images)
    assert np.allclose(info["mean"], mean, atol=1e-9) and np.allclose(info["std"], std, atol=1e-9)
    wids_desc = json.loads((cifar_shards / "mixed" / "train.wids.json").read_text())
    assert sum(s["nsamples"] for s in wids_desc["shardlist"]) == len(loaded)


def test_streamed_real_data_decodes_only_the_classes_asked_for(cifar_shards):
    shards_ = WdsShards(str(cifar_shards / "mixed"))
    real = StreamedRealData(ClassIndex(shards_, "train"), 10, None, cached_classes=2)
    g = torch.Generator().manual_seed(0)
    x = real.sample(3, 5, g)
    assert x.shape == (5, 3, 32, 32) and real.reads == real.count(3)  # one class decoded, nothing else
    real.sample(3, 5, g)
    real.sample(4, 5, g)
    assert real.reads == real.count(3) + real.count(4)  # class 3 was held, not decoded again
    real.sample(5, 5, g)  # holds at most 2 classes: 3 goes out
    real.sample(3, 5, g)
    assert real.reads == 2 * real.count(3) + real.count(4) + real.count(5)
    before = real.reads
    real.prefetch([8, 9])  # a unit's classes in one pass over the shards
    assert real.reads == before + real.count(8) + real.count(9)
    x = real.uint8(torch.cat([real.index[9][:2], real.index[8][:1]]))
    assert real.reads == before + real.count(8) + real.count(9)  # served from memory
    loaded = shards_.load("train")
    assert torch.equal(x, loaded.images[torch.cat([real.index[9][:2], real.index[8][:1]])])


def test_recover_from_indexed_shards_equals_recover_from_memory(cifar_shards, tmp_path):
    """DM from real init: npz in memory vs the same images as indexed shards (source order) vs shuffled shards with
    and without the index (the streamed and the whole-split paths pick the same positions)."""
    run(_dm(tmp_path / "npz", CIFAR), CPU)
    run(_dm(tmp_path / "plain", f"wds:{cifar_shards / 'plain'}"), CPU)
    a, _ = load_distilled(tmp_path / "npz")
    b, _ = load_distilled(tmp_path / "plain")
    assert torch.equal(a.images, b.images)

    engine = Engine(_dm(tmp_path / "probe", f"wds:{cifar_shards / 'mixed'}"), CPU)
    assert isinstance(engine.real, StreamedRealData)
    run(_dm(tmp_path / "mixed", f"wds:{cifar_shards / 'mixed'}"), CPU)
    unindexed = tmp_path / "unindexed"
    import shutil

    shutil.copytree(cifar_shards / "mixed", unindexed)
    info = json.loads((unindexed / "_info.json").read_text())
    del info["splits"]["train"]["class_index"]
    (unindexed / "_info.json").write_text(json.dumps(info))
    assert not isinstance(Engine(_dm(tmp_path / "probe2", f"wds:{unindexed}"), CPU).real, StreamedRealData)
    run(_dm(tmp_path / "whole", f"wds:{unindexed}"), CPU)
    c, _ = load_distilled(tmp_path / "mixed")
    d, _ = load_distilled(tmp_path / "whole")
    assert torch.equal(c.images, d.images)


def test_a_selection_method_streams_too(cifar_shards, tmp_path):
    run(RecoverConfig(out=str(tmp_path / "r1"), data=CIFAR, method="random", ipc=3), CPU)
    run(RecoverConfig(out=str(tmp_path / "r2"), data=f"wds:{cifar_shards / 'plain'}", method="random", ipc=3), CPU)
    assert torch.equal(load_distilled(tmp_path / "r1")[0].images, load_distilled(tmp_path / "r2")[0].images)


def test_shards_index_writes_the_index_for_shards_made_without_it(tmp_path):
    out = tmp_path / "wds"
    shards(ShardsConfig(data=CIFAR, out=str(out), maxcount=100, index=False, splits=["train"]), CPU)
    assert "class_index" not in json.loads((out / "_info.json").read_text())["splits"]["train"]
    with pytest.raises(DistillError, match="no class index"):
        ClassIndex(WdsShards(str(out)), "train")
    run_index(ShardsIndexConfig(data=f"wds:{out}"), CPU)
    index = ClassIndex(WdsShards(str(out)), "train")
    assert index.counts().sum() == len(Source(CIFAR).load("train"))


def test_bad_index_input_is_one_line(cifar_shards, tmp_path):
    with pytest.raises(DistillError, match="not webdataset shards"):
        ShardsIndexConfig(data=CIFAR)
    stale = tmp_path / "stale"
    import shutil

    shutil.copytree(cifar_shards / "plain", stale)
    info = json.loads((stale / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] -= 1
    (stale / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DistillError, match="does not match the shards"):
        ClassIndex(WdsShards(str(stale)), "train")
    info["splits"]["train"]["shard_lengths"][0] += 1
    info["splits"]["train"]["class_index"] = "../../etc/passwd"
    (stale / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DistillError):
        ClassIndex(WdsShards(str(stale)), "train")
