"""Wall time and memory of one DM / DC step over latents, with and without the engine's per-step render cache.

DM and DC ask the parametrization for each class's images separately. Without the cache a latent set runs the prior
once per class, and every class's graph is held until the loss is back-propagated, so the memory grows with the unit
(classes x IPC) whatever ``chunk`` says. With the cache it renders the unit once: one batched pass when the unit fits
in ``chunk``, else the chunked path (no graph in forward, one chunk's graph at a time in backward, at the price of a
second forward), so memory stays bounded by ``chunk`` as promised.
Both variants run the same step (same latents, real batches and network draw) alternately in one process, ``--reps``
times each, so host noise hits both; the table gives medians and their ratio. Priors are built from config
(untrained: the time of a pass does not depend on the weights).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/render_cache.py
    .venv/bin/python benchmarks/render_cache.py --size 64 --device cuda

Writes benchmarks/results/render_cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillset.core.data import Source
from distillset.generative.glad import build_glad
from distillset.generative.ld3m import build_ld3m
from distillset.generative.prior import SavedTensorMeter
from distillset.recover.base import Context
from distillset.recover.latent import GLaDSet, LD3MSet
from distillset.recover.objectives.dc import GradientMatching
from distillset.recover.objectives.dm import DistributionMatching
from distillset.recover.real import RealData

DATA = "npz:/work/shared/data/tinyimagenet10_64.npz"


def step_seconds(kind: str, folder: str, method: str, ipc: int, cached: bool, real: RealData, args,
                 device) -> tuple[float, float]:
    """Seconds of one step and the peak MB of tensors saved for backward during it."""
    cls = torch.arange(10).repeat_interleave(ipc)
    idx = torch.arange(ipc).repeat(10)
    ctx = Context(device=device, classes=cls.to(device), num_classes=10, image_shape=(3, args.size, args.size),
                  generator=torch.Generator().manual_seed(0), real=real, ipc=ipc)
    set_cls = LD3MSet if kind == "ld3m" else GLaDSet
    syn = set_cls.from_options(cls.to(device), idx, (3, args.size, args.size), 0, ctx, prior=folder, chunk=args.chunk,
                  init="noise").to(device)
    opts = {"batch_real": 32, "aug": "none", "width": 32}
    obj = DistributionMatching.from_options(**opts) if method == "dm" else GradientMatching.from_options(outer_loop=1, inner_loop=1, **opts)
    obj.setup(ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with SavedTensorMeter() as meter:
        with syn.step_cache() if cached else contextlib.nullcontext():
            loss = obj.loss(syn, ctx)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, meter.peak / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="LD3M DDIM steps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/render_cache.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    train = Source(DATA, args.size).load("train")
    real = RealData(train, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        build_ld3m(10, (3, args.size, args.size), ae="kl", down=4, width=16, unet_width=16,
                   steps=args.steps).save_pretrained(Path(tmp) / "ld3m")
        build_glad(10, (3, args.size, args.size), width=16, layer=1).save_pretrained(Path(tmp) / "glad")
        for kind in ("ld3m", "glad"):
            for method in ("dm", "dc"):
                for ipc in args.ipc:
                    times: dict[bool, list[float]] = {False: [], True: []}
                    mem: dict[bool, float] = {}
                    step_seconds(kind, str(Path(tmp) / kind), method, ipc, True, real, args, device)  # warm-up
                    for _ in range(args.reps):
                        for cached in (False, True):
                            s, mb = step_seconds(kind, str(Path(tmp) / kind), method, ipc, cached, real, args, device)
                            times[cached].append(s)
                            mem[cached] = mb
                    off, on = statistics.median(times[False]), statistics.median(times[True])
                    rows.append({"prior": kind, "method": method, "ipc": ipc, "off": off, "on": on,
                                 "mb_off": mem[False], "mb_on": mem[True]})
                    print(rows[-1], flush=True)
    lines = ["# Per-step render cache: one batched pass through the prior instead of one per class", "",
             (f"One step of DM / DC (10 classes, ConvNet width 32, 32 real images per class) over latents of an "
              f"untrained prior at {args.size} px (LD3M: KL autoencoder f4 + UNet width 16, {args.steps} DDIM steps, "
              f"checkpointing per UNet call; GLaD: style generator width 16, latents after layer 1), chunk "
              f"{args.chunk}. Median of {args.reps} alternating repetitions in one process on {args.device} "
              f"({os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load average "
              f"{os.getloadavg()[1]:.1f}); compare within the table only."), "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
             f"benchmarks/render_cache.py --size {args.size} --ipc {' '.join(map(str, args.ipc))} --chunk "
             f"{args.chunk} --steps {args.steps} --reps {args.reps} --device {args.device}`", "",
             ("`saved MB`: peak of tensors held for backward during the step (the objective's own network included); "
              "what chunking bounds."), "",
             "| prior | objective | IPC | per class s | cached s | speed-up | per class saved MB | cached saved MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['prior']} | {r['method']} | {r['ipc']} | {r['off']:.3f} | {r['on']:.3f} | "
                     f"{r['off'] / r['on']:.2f}x | {r['mb_off']:.1f} | {r['mb_on']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
