"""Backdoor attacks against dataset distillation (Liu et al., NDSS'23) at a CPU budget: for every (data, method) pair
one `distillset attack backdoor` run distils a clean, a NAIVEATTACK and a DOORPING set with the same seed and budget
and reports clean test accuracy (CTA) and attack success rate (ASR) of fresh students, mean +- std over seeds.

    OMP_NUM_THREADS=1 python benchmarks/backdoor.py                       # MNIST and the CIFAR-10 subset, DC and DM
    OMP_NUM_THREADS=1 python benchmarks/backdoor.py --pairs mnist:dm --iterations 100

Results: a table on stdout and ``benchmarks/results/backdoor.md``; each run's folder (backdoor.json/csv, asr.png,
triggers.png) under ``--root``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distillset.launch.backdoor import BackdoorConfig, run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = {"mnist": SHARED / "mnist.npz", "cifar10": SHARED / "cifar10.npz"}
# per-method budget: DC's engine step is ~10x a DM step (bi-level); DD unrolls its inner loop
METHOD = {
    "dc": {"options": {"batch_real": 32, "width": 32, "outer_loop": 10, "inner_loop": 5}, "iterations": 20},
    "dm": {"options": {"batch_real": 64, "width": 32}, "iterations": 100},
    "dd": {"options": {"real_batch": 128, "model_kwargs": {"width": 32}, "inner_steps": 5}, "iterations": 100},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", default="mnist:dc,mnist:dm,cifar10:dc,cifar10:dm")
    p.add_argument("--root", default="/tmp/distillset_backdoor")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=0, help="override every method's engine steps")
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--student-epochs", type=int, default=100)
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--trigger-size", type=int, default=4)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--init", default="real", help="synthetic images start from real images or noise")
    p.add_argument("--doorping", default='{"update_every": 10, "model_kwargs": {"width": 32}}')
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "backdoor.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = [("| data | method | set | CTA % | ASR % (own trigger) | ASR % of the clean set (naive / doorping trigger) "
              "| trigger distance, target / other classes | minutes |"), "|" + " --- |" * 8]
    results = {}
    for pair in a.pairs.split(","):
        data, method = pair.split(":")
        m = METHOD[method]
        t0 = time.perf_counter()
        cfg = BackdoorConfig(out=f"{a.root}/{data}_{method}", data=f"npz:{DATA[data]}", method=method,
                             options=m["options"], recover={"param_options": {"init": a.init}}, ipc=a.ipc,
                             iterations=a.iterations or m["iterations"],
                             trigger_size=a.trigger_size, poison_rate=a.poison_rate,
                             doorping=json.loads(a.doorping), students=a.students, student_epochs=a.student_epochs,
                             student_kwargs={"width": 32}, test_limit=a.test_limit)
        res = run(cfg)
        minutes = (time.perf_counter() - t0) / 60
        results[pair] = res["rows"]
        for r in res["rows"]:
            own = "-" if r["asr_mean"] is None else f"{100 * r['asr_mean']:.1f} +- {100 * r['asr_std']:.1f}"
            clean = " / ".join(f"{100 * x['mean']:.1f}" for x in r["asr"].values()) if r["set"] == "clean" else ""
            td = r["trigger_distance"].get(r["set"]) or r["trigger_distance"].get("doorping") or {}
            dist = f"{td['target']:.2f} / {td['others']:.2f}" if td else ""
            lines.append(f"| {data} | {method} | {r['set']} | {100 * r['cta_mean']:.1f} +- {100 * r['cta_std']:.1f} "
                         f"| {own} | {clean} | {dist} | {minutes:.1f} |")
        print("\n".join(lines), flush=True)
    header = (f"Backdoor attacks, IPC {a.ipc}, poison rate {a.poison_rate}, {a.trigger_size}x{a.trigger_size} trigger "
              f"bottom-right, target class 0, {a.students} students x {a.student_epochs} epochs (ConvNet width 32, "
              f"matching protocol), {a.test_limit} test images (the same number per class); 2-core CPU, shared, "
              "one thread.\n\n")
    Path(a.out).write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
