"""The shipped MTT/DATM recipes resolve through the recipe runner and run end to end at a debug size."""

from __future__ import annotations

import pytest

from distillset.core.config import load_yaml
from distillset.core.runtime import get_runtime
from distillset.launch.recipe import resolve
from distillset.recover.engine import run as recover_run
from distillset.squeeze.trajectories import run as record

DATA = "npz:tests/assets/cifar10_small.npz"


@pytest.mark.parametrize("name", ["mtt", "datm"])
def test_trajectory_recipes_resolve_and_run_tiny(name, tmp_path):
    rec = load_yaml(f"recipes/{name}_cifar10.yaml")
    stages = dict(resolve(rec, rec["out"]))
    assert stages["recover"].method == name
    assert stages["recover"].options["buffer"] == stages["squeeze_trajectories"].out
    assert stages["squeeze_trajectories"].arch == "convnet3" and stages["squeeze_trajectories"].lr == 0.01
    # debug size: one narrow expert, two iterations
    tiny = dict(rec)
    tiny["squeeze_trajectories"] = {**rec["squeeze_trajectories"], "out": str(tmp_path / "exp"), "data": DATA,
                                    "num_experts": 1, "epochs": 3, "model_kwargs": {"width": 8},
                                    "eval_test": False}
    opts = {**rec["recover"]["options"], "buffer": str(tmp_path / "exp"), "syn_steps": 2, "max_start_epoch": 1,
            "batch_syn": 0}
    if name == "datm":
        opts["current_max_start_epoch"] = 1
    tiny["recover"] = {**rec["recover"], "out": str(tmp_path / "rec"), "data": DATA, "ipc": 1, "iterations": 2,
                       "options": opts, "checkpoint_every": 0}
    stages = dict(resolve(tiny, str(tmp_path)))
    record(stages["squeeze_trajectories"], get_runtime())
    manifest = recover_run(stages["recover"], get_runtime())
    assert manifest["status"] == "complete" and manifest["num_images"] == 10
    assert (tmp_path / "rec" / "params" / "unit-000000.safetensors").exists()
