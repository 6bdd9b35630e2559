"""Locks: two runs into one folder share its units (each computed once), a dead holder's unit is taken over, and
the kernel-held locks need no stale-lock cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillset.core.distilled import load_distilled
from distillset.core.locks import hold, owner, try_lock

ROOT = Path(__file__).resolve().parents[1]

_HOLD = """
import sys, time
from distillset.core.locks import try_lock
lock = try_lock(sys.argv[1])
print("held" if lock else "busy", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_lock_is_exclusive_across_processes_and_freed_when_its_holder_dies(tmp_path):
    path = tmp_path / "locks" / "unit-000000.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), "30"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert try_lock(path) is None  # held by a live process
    assert "pid" in owner(path) and str(proc.pid) in owner(path)
    proc.kill()  # kill -9: no clean-up code runs
    proc.wait()
    lock = try_lock(path)  # the kernel dropped the dead holder's lock: nothing stale to detect or delete
    assert lock is not None
    lock.release(remove=True)
    assert not path.exists()


def test_shared_run_locks_exclude_an_exclusive_one(tmp_path):
    path = tmp_path / "run.lock"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distillset.core.locks import hold\n"
                             "l = hold(sys.argv[1], shared=True)\nprint('in', flush=True)\ntime.sleep(30)", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "in"
        assert hold(path, wait=False) is None  # another run is active: no exclusive lock (no temp-file cleaning)
        shared = hold(path, shared=True, wait=False)
        assert shared is not None
        shared.release()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_runs_into_one_folder_share_the_units(digits_teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLSET_PROGRESS": "0"}
    args = [sys.executable, "-m", "distillset.launch.cli", "recover", "--teachers", str(digits_teacher), "--ipc", "2",
            "--iterations", "60", "--classes-per-unit", "2", "--autocast", "none", "--aug-options",
            "{final_scale: 0.5, flip: false}"]
    procs = [subprocess.Popen([*args, "--out", str(tmp_path / "shared")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["runs"]) == 2  # both runs in the history
    done = [r["done"] for run in manifest["runs"] for r in run["ranks"]]
    assert sum(done) == 5 and len(done) == 2, done  # 10 classes / 2 per unit: every unit computed exactly once between the two runs
    single = subprocess.run([*args, "--out", str(tmp_path / "alone")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-1500:]
    a, b = load_distilled(tmp_path / "shared")[0], load_distilled(tmp_path / "alone")[0]
    assert torch.equal(a.images, b.images)
    assert not list((tmp_path / "shared").rglob(".*.tmp"))
