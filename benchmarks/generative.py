"""Pixel vs GLaD vs LD3M under DM and DC on Tiny-ImageNet-10, same budget, cross-architecture accuracy.

1. Trains two small priors on the Tiny-ImageNet-10 training split (cached in --work/priors): LD3M (KL autoencoder
   f4 + class-conditional UNet) and GLaD (built-in style generator, GAN).
2. For each objective (dm, dc) x IPC (1, 10) x parametrization (pixel, glad, ld3m): one recover run with the same
   number of iterations, init from real images for all three, Adam on the learnable tensors.
3. Trains fresh students on each distilled set and on random real images at the same IPC (ConvNet, ResNet-18) under
   the matching protocol (relabel.student.train_student: SGD, hard labels, DSA when available) and reports top-1 on
   the 500 test images.

The machine this was written on has 2 CPU cores shared by several people, so the defaults are a CPU budget
(<= 25 min wall in total, enforced by --budget_min: runs past it are listed as skipped): 32 px (the 64 px images
resized; pass --size 64 on a GPU), 20 iterations, 2 DDIM steps, DC with (outer, inner) loops (1, 1), DM/DC networks of width 64 with
64 real images per class, priors of width 16 trained a few hundred steps, students (ConvNet-3 width 32, ResNet-18)
trained for a fixed number of image passes (2000 / 500), one seed.
These are far from the papers' budgets: read the table as a comparison under one small budget, not as a
reproduction.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generative.py
    .venv/bin/python benchmarks/generative.py --size 64 --iterations 500 --students 3 --device cuda  # a GPU run

Writes benchmarks/results/generative.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillset.core.data import ImageSet, Source
from distillset.core.distilled import load_distilled
from distillset.generative.train import PriorTrainConfig
from distillset.generative.train import run as train_prior
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover
from distillset.relabel.evaluate import random_subset
from distillset.relabel.student import StudentSpec, train_student
from distillset.squeeze.train import channel_stats

DATA = "npz:/work/shared/data/tinyimagenet10_64.npz"
ARCH_NAMES = {"convnet": "ConvNet", "timm:resnet18": "ResNet-18"}


def priors(args) -> dict:
    out = {}
    common = {"data": args.data, "image_size": args.size, "batch_size": 32, "flip": True, "seed": 0}
    cfgs = {
        "ld3m": PriorTrainConfig(out=str(args.work / "priors" / f"ld3m_{args.size}"), kind="ld3m", autoencoder="kl",
                                 down=4, width=16, unet_width=args.unet_width, ae_steps=args.ae_steps, unet_steps=args.unet_steps,
                                 sample_steps=args.ddim_steps, lr=2e-3, **common),
        "glad": PriorTrainConfig(out=str(args.work / "priors" / f"glad_{args.size}"), kind="glad", width=args.gen_width,
                                 gan_steps=args.gan_steps, lr=2e-3, layer=1, **common),
    }
    for kind, cfg in cfgs.items():
        t0 = time.perf_counter()
        m = train_prior(cfg)
        print(f"prior {kind}: {json.dumps({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})} "
              f"({time.perf_counter() - t0:.0f}s here)", flush=True)
        out[kind] = cfg.out
        out[f"{kind}_train_s"] = m.get("seconds", 0.0)
    return out


def distil(args, method: str, ipc: int, param: str, prior_dirs: dict) -> Path:
    out = args.work / "runs" / f"{method}_ipc{ipc}_{param}_{args.size}_it{args.iterations}"
    if out.exists() and not (out / "manifest.json").exists():
        shutil.rmtree(out)
    popts: dict = {"init": "real"}
    if param == "ld3m":
        popts.update(prior=prior_dirs["ld3m"], chunk=args.chunk, steps=args.ddim_steps)
    elif param == "glad":
        popts.update(prior=prior_dirs["glad"], chunk=args.chunk)
    opts = {"batch_real": args.batch_real, "width": args.net_width}
    if method == "dc":
        opts.update(outer_loop=1, inner_loop=1)
    lr = {"pixel": args.lr_pixel, "glad": args.lr_latent, "ld3m": args.lr_latent}[param]
    cfg = RecoverConfig(out=str(out), data=args.data, image_size=args.size, method=method, options=opts,
                        parametrization=param, param_options=popts, augmentation="none", ipc=ipc,
                        iterations=args.iterations, lr=lr, optimizer="adam", betas=(0.9, 0.999), schedule="cosine",
                        classes_per_unit=0, log_every=10, channels_last=False, autocast="none")
    recover(cfg)
    return out


def evaluate(train: ImageSet, test: ImageSet, mean, std, args) -> dict[str, float]:
    """Top-1 of fresh students; every set gets the same number of student image passes (epochs = passes / size)."""
    res = {}
    for arch in args.archs:
        passes = args.student_passes if arch == "convnet" else args.resnet_passes
        kwargs = {"width": args.student_width} if arch == "convnet" else {}
        spec = StudentSpec(arch=arch, model_kwargs=kwargs, epochs=max(2, passes // len(train)), protocol="matching",
                           batch_size=min(256, len(train)))
        accs = [train_student(train, test, spec, mean, std, seed, args.device) for seed in range(args.students)]
        res[arch] = sum(accs) / len(accs)
    return res


CELL_ARGS = ("data", "size", "iterations", "lr_pixel", "lr_latent", "chunk", "ddim_steps", "batch_real", "net_width",
             "ae_steps", "unet_steps", "gan_steps", "unet_width", "gen_width", "archs", "student_passes",
             "resnet_passes", "student_width", "students", "device")


def cell(args, name: str, compute) -> dict:
    """One table row, cached in --work/cells so an interrupted benchmark resumes at the first unfinished cell (a
    cached row is reused only when every setting that shapes it is the same)."""
    key = {k: getattr(args, k) for k in CELL_ARGS}
    path = args.work / "cells" / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print({**saved["row"], "cached": True}, flush=True)
            return saved["row"]
    row = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "row": row}))
    tmp.replace(path)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--methods", nargs="+", default=["dm", "dc"])
    ap.add_argument("--params", nargs="+", default=["pixel", "glad", "ld3m"])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--lr_pixel", type=float, default=0.01)
    ap.add_argument("--lr_latent", type=float, default=0.02)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--ddim_steps", type=int, default=2)
    ap.add_argument("--batch_real", type=int, default=64)
    ap.add_argument("--net_width", type=int, default=64)
    ap.add_argument("--ae_steps", type=int, default=100)
    ap.add_argument("--unet_steps", type=int, default=200)
    ap.add_argument("--gan_steps", type=int, default=200)
    ap.add_argument("--unet_width", type=int, default=16)
    ap.add_argument("--gen_width", type=int, default=16)
    ap.add_argument("--archs", nargs="+", default=["convnet", "timm:resnet18"])
    ap.add_argument("--student_passes", type=int, default=2000, help="ConvNet student: images seen in training")
    ap.add_argument("--resnet_passes", type=int, default=500, help="ResNet-18 student: images seen in training")
    ap.add_argument("--student_width", type=int, default=32)
    ap.add_argument("--students", type=int, default=1)
    ap.add_argument("--budget_min", type=float, default=25.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/output/generative"))
    ap.add_argument("--out", default="benchmarks/results/generative.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    src = Source(args.data, args.size)
    train_all, test = src.load("train"), src.load("test")
    mean, std = channel_stats(train_all.images)
    prior_dirs = priors(args)
    t_priors = time.perf_counter() - t_start
    rows = []
    for ipc in args.ipc:
        def random_row(ipc=ipc):
            t0 = time.perf_counter()
            base = random_subset(train_all, ipc, 0, train_all.num_classes)
            return {"method": "random real", "ipc": ipc, "param": "-", "distil_s": 0.0,
                    **evaluate(base, test, mean, std, args), "eval_s": time.perf_counter() - t0}
        rows.append(cell(args, f"random_ipc{ipc}", random_row))
    for ipc in args.ipc:  # small IPC first: what the budget cuts is the most expensive cells
        for method in args.methods:
            for param in args.params:
                row = {"method": method, "ipc": ipc, "param": param}
                if (time.perf_counter() - t_start) / 60 > args.budget_min:
                    rows.append({**row, "skipped": True})
                    print(rows[-1], flush=True)
                    continue

                def distil_row(method=method, ipc=ipc, param=param, row=row):
                    t0 = time.perf_counter()
                    out = distil(args, method, ipc, param, prior_dirs)
                    row["distil_s"] = time.perf_counter() - t0
                    syn, _ = load_distilled(out)
                    t1 = time.perf_counter()
                    row.update(evaluate(syn, test, mean, std, args))
                    row["eval_s"] = time.perf_counter() - t1
                    return row
                rows.append(cell(args, f"{method}_ipc{ipc}_{param}", distil_row))
    total = time.perf_counter() - t_start
    write_table(args, rows, t_priors, total, prior_dirs)


def write_table(args, rows: list[dict], t_priors: float, total: float, prior_dirs: dict) -> None:
    arch_cols = [ARCH_NAMES.get(a, a) for a in args.archs]
    lines = ["# Distilling through generative priors: pixel vs GLaD vs LD3M (Tiny-ImageNet-10)", "",
             (f"Tiny-ImageNet-10 (1,000 train / 500 test, 10 classes) at {args.size} px. Same budget for every "
             f"parametrization: {args.iterations} recover iterations (Adam, cosine; lr {args.lr_pixel} pixels, "
             f"{args.lr_latent} latents), init from real images, DM/DC networks ConvNet width {args.net_width}, "
             f"{args.batch_real} real images per class per step, DC loops (1, 1). Priors trained here on the same "
             f"training split: LD3M = AutoencoderKL f4 (width 16, {args.ae_steps} steps) + class-conditional "
             f"UNet2DModel (width {args.unet_width}, {args.unet_steps} steps), {args.ddim_steps} DDIM steps, chunk {args.chunk}; "
             f"GLaD = built-in style generator (width {args.gen_width}, {args.gan_steps} GAN steps), latents after layer 1. "
             f"Students: matching protocol (SGD, hard labels, DSA), ConvNet-3 width {args.student_width} for "
             f"{args.student_passes} image passes (epochs = passes / set size), ResNet-18 (timm, ImageNet stem) for "
             f"{args.resnet_passes} passes, {args.students} seed(s); top-1 (%) on the 500 test images."),
             "", (f"Wall time: prior training (one-off, cached in --work) LD3M {prior_dirs['ld3m_train_s'] / 60:.1f} "
                  f"min, GLaD {prior_dirs['glad_train_s'] / 60:.1f} min; this run {total / 60:.1f} min of which "
                  f"{t_priors / 60:.1f} min priors (budget {args.budget_min:.0f} min, cells started past it are "
                  f"skipped; {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
                  f"load average at the end {os.getloadavg()[1]:.1f}; cells reused from an interrupted run keep "
                  "their own times)."), "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
             "benchmarks/generative.py " + " ".join(sys.argv[1:]) + "`",
             "",
             "| objective | IPC | parametrization | " + " | ".join(arch_cols) + " | distil s | eval s |",
             "| --- | --- | --- | " + " | ".join("---" for _ in arch_cols) + " | --- | --- |"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['method']} | {r['ipc']} | {r['param']} | " +
                         " | ".join("skipped (budget)" for _ in arch_cols) + " | - | - |")
            continue
        accs = " | ".join(f"{100 * r[a]:.1f}" for a in args.archs)
        lines.append(f"| {r['method']} | {r['ipc']} | {r['param']} | {accs} | {r['distil_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
