"""Peak memory of one MTT loss + backward, unrolled vs TESLA (the adjoint pass), at N = 10, 20, 40 student steps.

Same config for every row: ConvNet-3 (instance norm) on 3x32x32 images, 10 classes, IPC 2 (20 images, batch_syn
20), DSA off. Each row runs in a fresh subprocess and reports (a) the peak bytes autograd holds for backward (saved
tensors, counted with ``torch.autograd.graph.saved_tensors_hooks``) and (b) the growth of the process's peak
resident memory (``ru_maxrss``) during the loss + backward. Memory does not depend on the parameter values, so the
expert buffer is a random walk from a fresh initialisation. Writes ``benchmarks/results/mtt_memory.md``.

    .venv/bin/python benchmarks/mtt_memory.py [--width 64] [--steps 10,20,40]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_buffer(folder: Path, width: int) -> None:
    from distillset.core.io import save_tensors
    from distillset.squeeze.models import create_model
    from distillset.squeeze.trajectories import FlatModel

    torch.manual_seed(0)
    model = create_model("convnet3", 10, 3, 32, width=width)
    start = FlatModel(model).flatten()
    walk = torch.cumsum(torch.randn(6, start.numel()) * 1e-3, 0)
    traj = torch.cat([start[None], start[None] + walk])
    meta = {"arch": "convnet3", "model_kwargs": json.dumps({"width": width}), "num_classes": 10,
            "image_shape": json.dumps([3, 32, 32]), "mean": json.dumps([0.5] * 3), "std": json.dumps([0.25] * 3),
            "num_params": traj.shape[1], "epochs": 6, "lr": 0.01, "momentum": 0.0, "fingerprint": "memory-bench",
            "data": "random", "test_top1": "null"}
    save_tensors(folder / "replay_buffer_0.safetensors", {"trajectory": traj}, meta)


def measure(buffer: str, tesla: bool, steps: int) -> dict:
    """One loss + backward in this process; returns peak saved-tensor bytes and peak RSS growth."""
    from distillset.recover.base import Context, get
    from distillset.recover.params import PixelSet

    cls = torch.arange(10).repeat_interleave(2)
    ctx = Context(device=torch.device("cpu"), classes=cls, num_classes=10, image_shape=(3, 32, 32),
                  generator=torch.Generator().manual_seed(0), augment=None)
    syn = PixelSet.from_options(cls, torch.arange(2).repeat(10), (3, 32, 32), 0, ctx)
    obj = get("objective", "mtt").from_options(buffer=buffer, tesla=tesla, syn_steps=steps, expert_epochs=2,
                                               max_start_epoch=2)
    obj.setup(ctx)
    state = {"live": 0, "peak": 0}
    refs: dict[int, int] = {}

    class Held:  # counts each storage once however many graph nodes save it
        def __init__(self, t):
            self.t, self.key = t, t.untyped_storage().data_ptr()
            refs[self.key] = refs.get(self.key, 0) + 1
            if refs[self.key] == 1:
                state["live"] += t.untyped_storage().nbytes()
                state["peak"] = max(state["peak"], state["live"])

        def __del__(self):
            refs[self.key] -= 1
            if refs[self.key] == 0:
                del refs[self.key]
                state["live"] -= self.t.untyped_storage().nbytes()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        loss = obj.loss(syn, ctx)
        loss.backward()
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tesla": tesla, "steps": steps, "saved_mb": state["peak"] / 2 ** 20, "rss_growth_mb": (rss1 - rss0) / 1024,
            "seconds": seconds, "loss": float(loss.detach()), "params": obj.net.num_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", default="10,20,40")
    p.add_argument("--child", nargs=3, metavar=("BUFFER", "TESLA", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=Path(__file__).parent / "results" / "mtt_memory.md")
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1] == "1", int(a.child[2]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_buffer(Path(tmp), a.width)
        for steps in map(int, a.steps.split(",")):
            for tesla in (False, True):
                out = subprocess.run([sys.executable, __file__, "--child", tmp, str(int(tesla)), str(steps)],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    lines = ["# MTT peak memory: unrolled vs TESLA", "",
             (f"One loss + backward; ConvNet-3 width {a.width} (instance norm, {rows[0]['params']:,} parameters), "
             "3x32x32 images, 10 classes x IPC 2 (batch_syn 20), no augmentation, CPU float32. `graph MB` = peak "
             "bytes of the distinct storages autograd saved for backward; `RSS growth MB` = growth of the process's "
             "peak resident memory during the call (fresh process per row)."), "",
             "| syn_steps N | method | graph MB | RSS growth MB | seconds | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['steps']} | {'TESLA (adjoint)' if r['tesla'] else 'unrolled'} | {r['saved_mb']:.1f} | "
                     f"{r['rss_growth_mb']:.1f} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    lines += ["", ("The two methods give the same loss and (see tests/test_trajectory_mtt.py) the same gradient. "
              "TESLA keeps the N parameter vectors (4 bytes x parameters x N, small beside the activations) and one "
              "step's graph at a time; the unrolled gradient keeps all N steps' graphs."), "",
              "Command: `.venv/bin/python benchmarks/mtt_memory.py " + " ".join(sys.argv[1:]) + "`"]
    a.result.parent.mkdir(parents=True, exist_ok=True)
    a.result.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
