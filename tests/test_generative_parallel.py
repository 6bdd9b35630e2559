"""`distillset prior train` under `accelerate launch`: two gloo processes train the same prior as one process (each
takes half of every global batch and the gradients are summed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior
from tests.procs import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
DATA = "npz:" + str(ROOT / "tests" / "assets" / "tiny10_small.npz")
TINY = {"image_size": 16, "flip": True, "batch_size": 8, "width": 8, "unet_width": 8, "down": 2,
        "train_timesteps": 50, "sample_steps": 2, "z_dim": 16, "w_dim": 32, "ae_steps": 3, "unet_steps": 3,
        "gan_steps": 3, "max_classes": 4}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ld3m", "glad"])
def test_two_processes_train_the_single_process_prior(kind, tmp_path):
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: kernels then round alike and only the batch split differs
    try:
        train_prior(PriorTrainConfig(out=str(one), data=DATA, kind=kind, **TINY))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DISTILLSET_PROGRESS": "0",
           "PYTHONPATH": str(ROOT)}
    flags = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()]
    two = tmp_path / "two"
    proc = subprocess.run([*accelerate_launch(2), "-m", "distillset.launch.cli", "prior", "train", "--kind", kind,
                           "--data", DATA, "--out", str(two), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and len(a) > 10
    # Equal up to the order of float sums (two half-batch gradients added vs one full-batch gradient). Parameters whose
    # true gradient is zero (a bias or time embedding added right before a GroupNorm, which removes it) get pure
    # rounding noise as gradient, and Adam turns any nonzero gradient into a step of about lr: those may differ by up
    # to lr per step, and nothing else may.
    steps = TINY["ae_steps"] + TINY["unet_steps"] if kind == "ld3m" else TINY["gan_steps"]
    off = total = 0
    for k in a:
        diff = (a[k] - b[k]).abs()
        off += int((diff > 1e-5 + 1e-3 * a[k].abs()).sum())
        total += diff.numel()
        assert float(diff.max()) <= 2e-3 * steps, k  # lr 2e-3
    # measured 0.6%; without the gradient sum each process would follow its own half-batch gradient
    assert off <= 0.03 * total, (off, total)
    changed = 0
    init = PriorTrainConfig(out=str(tmp_path / "init"), data=DATA, kind=kind,
                            **{**TINY, "ae_steps": 0, "unet_steps": 0, "gan_steps": 0})
    train_prior(init)
    for k, v in _weights(tmp_path / "init").items():
        changed += int(not torch.equal(v, a[k]))
    assert changed > len(a) // 2  # the comparison is between trained weights, not two copies of the init
