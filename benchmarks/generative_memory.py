"""Peak memory of one distillation step through a generative prior: chunked back-prop (flat) vs direct (grows).

One DM step (the real objective from recover/objectives/dm.py, one class, a fixed random ConvNet) over an LD3M and a
GLaD latent set at IPC 1, 10 and 50, with ``chunk`` = 0 (one graph over all images) and ``chunk`` = 5. Memory is the
peak of tensors held for backward (saved-tensor hooks: device-independent, and what chunking controls), plus the
CUDA allocator peak when a GPU is used. Priors are built from config (untrained: memory does not depend on weights)
and saved to a temporary folder.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generative_memory.py            # ~3-6 min on 2 busy CPU cores
    .venv/bin/python benchmarks/generative_memory.py --size 64 --ipc 1 10 50 --device cuda

Writes benchmarks/results/generative_memory.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillset.core.data import ImageSet, Source
from distillset.generative.glad import build_glad
from distillset.generative.ld3m import build_ld3m
from distillset.generative.prior import SavedTensorMeter
from distillset.recover.base import Context
from distillset.recover.latent import GLaDSet, LD3MSet
from distillset.recover.objectives.dm import DistributionMatching
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData

DATA = "npz:/work/shared/data/tinyimagenet10_64.npz"


def one_step(kind: str, folder: str, ipc: int, chunk: int, real: RealData, size: int, device) -> dict:
    cls = torch.zeros(ipc, dtype=torch.long)
    idx = torch.arange(ipc)
    ctx = Context(device=device, classes=cls.to(device), num_classes=10, image_shape=(3, size, size),
                  generator=torch.Generator().manual_seed(0), real=real, mean=[0.5] * 3, std=[0.5] * 3)
    if kind == "pixel":  # the objective's own memory (its network over the synthetic images), for reference
        syn = PixelSet.from_options(cls.to(device), idx, (3, size, size), 0, ctx).to(device)
    else:
        set_cls = LD3MSet if kind == "ld3m" else GLaDSet
        syn = set_cls.from_options(cls.to(device), idx, (3, size, size), 0, ctx, prior=folder, chunk=chunk, init="noise").to(device)
    obj = DistributionMatching.from_options(batch_real=64, aug="none", width=64)
    obj.setup(ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with SavedTensorMeter() as meter:
        loss = obj.loss(syn, ctx)
        loss.backward()
    seconds = time.perf_counter() - t0
    grads = sum(float(p.grad.abs().sum()) for p in syn.parameters() if p.grad is not None)
    out = {"saved_mb": meter.peak / 2 ** 20, "seconds": seconds, "grad_nonzero": grads > 0}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--chunk", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="LD3M DDIM steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/generative_memory.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    train = Source(DATA, args.size).load("train")
    real = RealData(ImageSet(train.images, train.labels, train.class_names), device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ld3m = build_ld3m(10, (3, args.size, args.size), ae="kl", down=4, width=16, unet_width=32, steps=args.steps)
        ld3m.save_pretrained(Path(tmp) / "ld3m")
        glad = build_glad(10, (3, args.size, args.size), width=32, layer=1)
        glad.save_pretrained(Path(tmp) / "glad")
        for kind in ("pixel", "ld3m", "glad"):
            for ipc in args.ipc:
                for chunk in ((0,) if kind == "pixel" else (0, args.chunk)):
                    r = one_step(kind, str(Path(tmp) / kind), ipc, chunk, real, args.size, device)
                    rows.append({"prior": kind, "ipc": ipc, "mode": f"chunked ({chunk})" if chunk else "direct", **r})
                    print(rows[-1], flush=True)
    lines = ["# Generative priors: memory of one distillation step", "",
             (f"One DM step (one class, ConvNet width 64, 64 real images) over latents of an untrained prior at "
             f"{args.size} px (LD3M: KL autoencoder f4 + UNet width 32, {args.steps} DDIM steps, gradient "
             "checkpointing per UNet call; GLaD: built-in style generator width 32, latents after layer 1). "
             "`saved MB` is the peak of tensors held for backward (saved-tensor hooks), which is what chunking "
             "bounds; images and latents themselves are not included. `through the prior MB` subtracts the pixel "
             "parametrization's peak at the same IPC (the objective's own network over the synthetic images, which "
             "grows with IPC whatever the parametrization). Seconds are wall time on a shared, loaded CPU: "
             "compare them only within one run."), "",
             (f"Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generative_memory.py --size {args.size} "
             f"--ipc {' '.join(map(str, args.ipc))} --chunk {args.chunk} --device {args.device}`"), "",
             "| prior | IPC | back-prop | saved MB | through the prior MB | " + ("CUDA peak MB | " if device.type == "cuda" else "") +
             "seconds |", "| --- | --- | --- | --- | --- | " + ("--- | " if device.type == "cuda" else "") + "--- |"]
    pixel = {r["ipc"]: r["saved_mb"] for r in rows if r["prior"] == "pixel"}
    for r in rows:
        cuda = f"{r['cuda_peak_mb']:.1f} | " if "cuda_peak_mb" in r else ""
        extra = "-" if r["prior"] == "pixel" else f"{r['saved_mb'] - pixel[r['ipc']]:.1f}"
        lines.append(f"| {r['prior']} | {r['ipc']} | {r['mode']} | {r['saved_mb']:.1f} | {extra} | {cuda}"
                     f"{r['seconds']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
