"""Shared fixtures: a tiny BatchNorm teacher trained on digits once per session (about a second)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
CIFAR = f"npz:{ASSETS / 'cifar10_small.npz'}"
TINY = f"npz:{ASSETS / 'tiny10_small.npz'}"
MNIST = f"npz:{ASSETS / 'mnist_small.npz'}"

os.environ.setdefault("DISTILLSET_PROGRESS", "0")
# `make test` runs the suite in pytest-xdist workers, one per core: each worker takes its share of the cores, so
# the workers do not oversubscribe them (a plain `pytest` run keeps up to 2 threads)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    from distillset.squeeze.train import SqueezeConfig, run

    out = tmp_path_factory.mktemp("teacher") / "digits_bn"
    run(SqueezeConfig(out=str(out), data="digits", arch="convnet_bn", model_kwargs={"width": 32}, epochs=8,
                      flip=False, autocast="none"))
    return out


@pytest.fixture(scope="session")
def digits_teacher_in(tmp_path_factory) -> Path:
    """A teacher without BatchNorm (instance norm), for the BN-inversion error path."""
    from distillset.squeeze.train import SqueezeConfig, run

    out = tmp_path_factory.mktemp("teacher") / "digits_in"
    run(SqueezeConfig(out=str(out), data="digits", arch="convnet_in", model_kwargs={"width": 16}, epochs=1,
                      flip=False, autocast="none"))
    return out
