"""DM's step: all classes of a unit in one forward vs class by class, interleaved in one run, fp32 and bf16.

One step = the DM loss over the unit's classes (a fresh random ConvNet-3, DSA, ``batch_real`` real images per
class) and its backward to the images, as `recover` runs it. Prints ms per step (median of the repeats), achieved
GFLOP/s (torch's FlopCounterMode on one step) and the ratio to the class-by-class path, and checks that both paths
give the same loss.

    OMP_NUM_THREADS=2 python benchmarks/dm_step.py [--classes 10 --ipc 10 --batch-real 256 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distillset.core.data import Source
from distillset.recover.base import Context, get
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"npz:{SHARED / 'cifar10.npz'}")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dm_step.md"))
    a = p.parse_args()
    real = RealData(Source(a.data).load("train"))
    dm = get("objective", "dm").from_options(batch_real=a.batch_real, width=a.width)
    cls = torch.arange(a.classes).repeat_interleave(a.ipc)
    shape = tuple(real.images.shape[1:])

    def step(batched: bool, dtype) -> tuple[float, float]:
        ctx = Context(device=torch.device("cpu"), classes=cls, num_classes=a.classes, image_shape=shape,
                      generator=torch.Generator().manual_seed(0), real=real, autocast_dtype=dtype, ipc=a.ipc)
        dm.setup(ctx)
        syn = PixelSet.from_options(cls, torch.arange(a.ipc).repeat(a.classes), shape, 0, ctx, init="real")
        net = dm.source.sample(ctx)
        for q in net.parameters():
            q.requires_grad_(False)
        t = time.perf_counter()
        loss = torch.stack(dm.class_gaps(syn, ctx, net, batched=batched)).sum()
        loss.backward()
        return time.perf_counter() - t, float(loss)

    rows = []
    for dtype in (None, torch.bfloat16):
        times = {False: [], True: []}
        losses = {}
        for _ in range(a.repeats):  # interleaved: both paths see the same machine load
            for batched in (False, True):
                s, losses[batched] = step(batched, dtype)
                times[batched].append(s)
        with FlopCounterMode(display=False) as fc:
            step(True, dtype)
        flops = fc.get_total_flops()
        for batched in (False, True):
            ms = 1000 * statistics.median(times[batched])
            rows.append((("bf16" if dtype else "fp32"), "one forward" if batched else "class by class", ms,
                         flops / (ms / 1000) / 1e9, losses[batched]))
    base = {r[0]: r[2] for r in rows if r[1] == "class by class" and r[0] == "fp32"}["fp32"]
    lines = ["# DM step: batched classes vs class by class", "",
             f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/dm_step.py --classes {a.classes} "
             f"--ipc {a.ipc} --batch-real {a.batch_real} --width {a.width} --repeats {a.repeats}`; "
             f"{flops / 1e9:.1f} GFLOP per step (FlopCounterMode).", "",
             "| precision | path | ms / step (median) | GFLOP/s | speed-up vs fp32 class by class | loss |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {d} | {path} | {ms:.0f} | {gf:.0f} | {base / ms:.2f}x | {loss:.4f} |"
              for d, path, ms, gf, loss in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
