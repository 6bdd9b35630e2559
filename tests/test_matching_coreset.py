"""Coreset baselines on the CIFAR-10 fixture: valid selections, and each method's criterion beats random."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillset.core.data import Source
from distillset.core.distilled import load_distilled
from distillset.recover.base import Context, get
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run
from distillset.recover.real import RealData

DATA = "npz:tests/assets/cifar10_small.npz"


@pytest.fixture(scope="module")
def real() -> RealData:
    return RealData(Source(DATA).load("train"))


def class_ctx(real: RealData, c: int, ipc: int, seed: int = 0) -> Context:
    return Context(device=torch.device("cpu"), classes=torch.full((ipc,), c), num_classes=10,
                   image_shape=(3, 32, 32), generator=torch.Generator().manual_seed(seed), real=real,
                   mean=[0.5] * 3, std=[0.5] * 3, ipc=ipc)


@pytest.mark.parametrize("name,options", [("random", {}), ("herding", {}), ("kcenter", {}),
                                          ("herding", {"features": "pixels"}),
                                          ("forgetting", {"epochs": 2, "width": 16})])
def test_selection_is_ipc_distinct_images_of_the_class(real, name, options):
    obj = get("objective", name).from_options(**options)
    assert obj.selects
    obj.setup(class_ctx(real, 0, 5))
    for c in (0, 3, 9):
        idx = obj.select(class_ctx(real, c, 5), 5)
        assert idx.numel() == 5 and idx.unique().numel() == 5
        assert (real.labels[idx] == c).all()


def _random_features(obj, real, c):
    return obj.class_features(c, class_ctx(real, c, 1))


def test_herding_mean_closer_than_random_and_kcenter_covers_better(real):
    herd, kc = get("objective", "herding").from_options(), get("objective", "kcenter").from_options()
    herd.setup(class_ctx(real, 0, 5))
    kc.setup(class_ctx(real, 0, 5))
    g = torch.Generator().manual_seed(0)
    for c in (1, 4):
        f = _random_features(herd, real, c)
        pos = {int(i): k for k, i in enumerate(real.index[c])}
        mu = f.mean(0)
        sel = [pos[int(i)] for i in herd.select(class_ctx(real, c, 5), 5)]
        gap_herd = float((f[sel].mean(0) - mu).norm())
        rand = [float((f[torch.randperm(len(f), generator=g)[:5]].mean(0) - mu).norm()) for _ in range(20)]
        assert gap_herd < min(rand), (gap_herd, min(rand))
        # k-center: the largest distance from any image to its nearest chosen one (covering radius) is smaller
        selk = [pos[int(i)] for i in kc.select(class_ctx(real, c, 5), 5)]

        def radius(idx, f=f):
            return float(torch.cdist(f, f[idx]).min(1).values.max())

        rand_r = [radius(torch.randperm(len(f), generator=g)[:5]) for _ in range(20)]
        assert radius(selk) < sum(rand_r) / len(rand_r)


def test_forgetting_orders(real):
    most = get("objective", "forgetting").from_options(epochs=2, width=16, order="most")
    least = get("objective", "forgetting").from_options(epochs=2, width=16, order="least")
    most.setup(class_ctx(real, 0, 5))
    least._counts, least._key = most._counts, (id(real), len(real.labels))  # share the (deterministic) scoring run
    assert most._counts.max() > 0  # some images were forgotten or never learned
    for c in (2, 5):
        m, lst = most.select(class_ctx(real, c, 5), 5), least.select(class_ctx(real, c, 5), 5)
        assert most._counts[m].float().mean() > most._counts[lst].float().mean()
        assert most._counts[m].min() >= most._counts[real.index[c]].float().median()


def test_engine_writes_herding_selection(real, tmp_path):
    cfg = RecoverConfig(out=str(tmp_path / "herd"), data=DATA, method="herding", ipc=3, iterations=0,
                        augmentation="none", classes_per_unit=5, param_options={"init": "real"})
    manifest = run(cfg)
    assert manifest["status"] == "complete" and manifest["num_images"] == 30
    images, _ = load_distilled(cfg.out)
    obj = get("objective", "herding").from_options()
    obj.setup(class_ctx(real, 0, 3))
    want = real.images[obj.select(class_ctx(real, 7, 3), 3)]
    got = images.images[images.labels == 7]
    assert torch.equal(got.sort(0).values, want.sort(0).values)  # exactly the chosen real images, lossless
    again = run(dataclasses.replace(cfg))  # finished units are skipped
    assert again["status"] == "complete"


def test_random_baseline_is_the_init_from_real_starting_point(tmp_path):
    """`random`, init-from-real (before any step, whatever the unit layout) and evaluate's random baseline are the
    same real images for one seed, so "distilled vs random" measures what the optimisation added."""
    from distillset.relabel.evaluate import random_subset

    common = {"data": DATA, "ipc": 3, "seed": 5, "augmentation": "none", "autocast": "none"}
    run(RecoverConfig(out=str(tmp_path / "random"), method="random", iterations=0, classes_per_unit=10, **common))
    run(RecoverConfig(out=str(tmp_path / "init"), method="dm", iterations=0, param_options={"init": "real"},
                      classes_per_unit=3, ipc_per_unit=2, **common))
    rand, _ = load_distilled(tmp_path / "random")
    init, _ = load_distilled(tmp_path / "init")
    assert torch.equal(rand.labels, init.labels) and torch.equal(rand.images, init.images)
    base = random_subset(Source(DATA).load("train"), 3, 5, 10)
    assert torch.equal(base.images, rand.images)
    for c in range(10):  # distinct images within a class
        assert rand.images[rand.labels == c].flatten(1).unique(dim=0).shape[0] == 3
