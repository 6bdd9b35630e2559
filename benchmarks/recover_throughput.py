"""Recover throughput: distillset's loop vs a plain eager fp32 SRe2L loop, same math, same init, one process.

For each backbone (ResNet-18 CIFAR stem at 32 px, ConvNet-3 with BatchNorm) both loops optimise the same initial
images for the same number of steps, interleaved (reference, distillset, reference, ...) so that noise from other
processes on the machine hits both alike. Reported: images x iterations per second (median over repeats), the ratio,
achieved GFLOP/s (FLOPs of one forward+backward counted by torch's FlopCounterMode) against the machine's matmul peak
measured here (large fp32 and bf16 matmuls), and the final SRe2L loss (CE + r_bn x BN, the same rms-normalised BN
term) of each loop's images evaluated the same way: fp32, no augmentation, so speed cannot come from worse
optimisation.

    python benchmarks/recover_throughput.py [--iters 30 --repeats 3 --threads 1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import publish
from distillset.core.runtime import Runtime, autocast_dtype
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import Engine, plan_units
from distillset.squeeze.checkpoint import BackboneConfig, load_teacher, save_backbone
from distillset.squeeze.models import create_model

R_BN, FIRST_BN = 1.0, 10.0


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def make_teacher(folder: Path, arch: str, classes: int = 10, size: int = 32) -> str:
    torch.manual_seed(0)
    model = create_model(arch, classes, 3, size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, size, size))
    save_backbone(folder, model.eval(), BackboneConfig(arch, classes, 3, size, [0.5] * 3, [0.25] * 3,
                                                       [str(i) for i in range(classes)]))
    return str(folder)


# ------------------------------------------------------------------------------------------- the plain reference


class RefHooks:
    """Straightforward forward hooks: mean and var of every BN input, distance to the running statistics."""

    def __init__(self, model):
        self.values, self.handles = [], []
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                self.handles.append(m.register_forward_hook(self.hook))

    def hook(self, m, inputs, out):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        d = torch.norm(mean - m.running_mean, 2) + torch.norm(var - m.running_var, 2)
        self.values.append(d / math.sqrt(m.num_features))

    def bn(self):
        w = [FIRST_BN] + [1.0] * (len(self.values) - 1)
        total = sum(wi * v for wi, v in zip(w, self.values)) / sum(w)
        self.values = []
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


def random_resized_crop(x, g, min_scale):
    """Per-image RandomResizedCrop + flip written directly with affine_grid/grid_sample (drawn on the CPU generator
    ``g``, applied on ``x``'s device)."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(min_scale, 1.0, generator=g)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1)
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def reference(teacher, init_norm, labels, iters, lr=0.25, seed=0):
    """Plain eager fp32 SRe2L: Adam (0.5, 0.9), cosine lr, crop each step, CE + BN. Returns images and seconds."""
    model = teacher.model
    mean, std = teacher.mean, teacher.std
    data = init_norm.clone().requires_grad_(True)
    opt = torch.optim.Adam([data], lr=lr, betas=(0.5, 0.9))
    hooks = RefHooks(model)
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    t = time.perf_counter()
    for step in range(iters):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / iters))
        x = data * std + mean
        x = random_resized_crop(x, g, 0.08)
        logits = model((x - mean) / std)
        loss = F.cross_entropy(logits, labels) + R_BN * hooks.bn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            data.copy_(torch.max(torch.min(data, hi), lo))
    seconds = time.perf_counter() - t
    hooks.remove()
    return (data.detach() * std + mean).clamp(0, 1), seconds


@torch.no_grad()
def final_loss(teacher, images, labels) -> float:
    """CE + r_bn x BN of images in [0, 1], fp32, no augmentation (the same evaluation for both loops)."""
    model = teacher.model.to(memory_format=torch.contiguous_format)
    hooks = RefHooks(model)
    logits = model(((images.float() - teacher.mean) / teacher.std).contiguous())
    loss = F.cross_entropy(logits, labels) + R_BN * hooks.bn()
    hooks.remove()
    return float(loss)


def flops_per_iter(teacher, n: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(n, *teacher_shape(teacher), requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        teacher.model(x).sum().backward()
    return float(fc.get_total_flops())


def teacher_shape(teacher):
    c = teacher.config
    return (c.in_chans, c.img_size, c.img_size)


def bench(arch: str, n_images: int, iters: int, repeats: int, root: Path, compile_: bool = False) -> dict:
    path = make_teacher(root / arch, arch)
    rt = Runtime(None, 0, 1, torch.device("cpu"))
    classes = 10
    ipc = n_images // classes
    cfg = RecoverConfig(out=str(root / "out"), teachers=[path], method="sre2l", ipc=ipc, iterations=iters,
                        classes_per_unit=0, log_every=max(iters, 1), options={"r_bn": R_BN, "first_bn_mult": FIRST_BN},
                        aug_options={"milestone": 0.0})
    engine = Engine(cfg, rt)
    variants = {"distillset": engine}
    first = {}
    if compile_:  # a second engine whose teacher is torch.compile'd; its first run (the compilation) is timed apart
        variants["compiled"] = Engine(dataclasses.replace(cfg, compile=True), rt)
    unit = plan_units(classes, ipc, 0, 0)[0]
    cls, idx = unit.classes_and_indices()
    init = engine.param_cls(engine.param_cfg, cls, idx, engine.image_shape, cfg.seed, engine.context(unit)).data.detach().clone()
    ref_teacher = load_teacher(path)  # a separate, untouched copy: contiguous fp32 eager
    fl = flops_per_iter(ref_teacher, n_images)
    for name, eng in variants.items():  # warm-up: one run of each, so no variant's first-call costs are timed
        t = time.perf_counter()
        eng.optimise(unit)
        first[name] = time.perf_counter() - t
    rows = {"reference": [], **{name: [] for name in variants}}
    losses = {}
    for r in range(repeats):
        imgs, sec = reference(ref_teacher, init, cls, iters)
        rows["reference"].append(n_images * iters / sec)
        losses.setdefault("reference", []).append(final_loss(ref_teacher, imgs, cls))
        for name, eng in variants.items():
            syn, logs = eng.optimise(unit)
            rows[name].append(n_images * iters / logs["seconds"])
            losses.setdefault(name, []).append(final_loss(ref_teacher, syn.render().detach(), cls))
    out = {"arch": arch, "images": n_images, "iters": iters, "repeats": repeats, "gflop_per_iter": fl / 1e9,
           "autocast": str(autocast_dtype(cfg.autocast, torch.device("cpu"))), "first": first,
           "variants": list(variants)}
    for k, vals in rows.items():
        med = statistics.median(vals)
        out[k] = {"ips": med, "all": vals, "gflops": med / n_images * fl / 1e9, "loss": statistics.median(losses[k])}
    if compile_:  # the compilation's cost: the first run's time beyond what the compiled steps themselves took
        out["compile_s"] = first["compiled"] - n_images * iters / out["compiled"]["ips"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--archs", default="resnet18_cifar:50,convnet3_bn:200")
    p.add_argument("--threads", default="", help="comma-separated intra-op thread counts to measure in turn "
                   "(default: the current setting, OMP_NUM_THREADS)")
    p.add_argument("--compile", action="store_true", help="also time distillset with its teacher torch.compile'd "
                   "(compile_min_steps decides this in a run); the inductor cache starts empty, so the compile time "
                   "reported is a cold one")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "recover_throughput.md"))
    a = p.parse_args()
    thread_counts = [int(t) for t in a.threads.split(",")] if a.threads else [torch.get_num_threads()]
    results, peaks = [], {}
    t0 = time.time()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if a.compile:  # a cold inductor cache: the compile time reported is what a fresh machine pays
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            peaks[threads] = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
            print(f"threads {threads}; matmul peak fp32 {peaks[threads][0]:.0f} GFLOP/s, bf16 "
                  f"{peaks[threads][1]:.0f} GFLOP/s", flush=True)
            for spec in a.archs.split(","):
                arch, n = spec.split(":")
                res = bench(arch, int(n), a.iters, a.repeats, Path(tmp) / f"t{threads}", a.compile)
                res["threads"] = threads
                for name in res["variants"]:
                    res[name]["paired"] = statistics.median(d / r for d, r in zip(res[name]["all"],
                                                                                  res["reference"]["all"]))
                    res[name]["peak"] = res[name]["gflops"] / peaks[threads][1]
                results.append(res)
                print(res, flush=True)
    load1 = os.getloadavg()
    lines = [
        "# Recover throughput (SRe2L hot loop)", "",
        (f"Command: `python benchmarks/recover_throughput.py --iters {a.iters} --repeats {a.repeats} "
         f"--archs {a.archs}" + (f" --threads {a.threads}" if a.threads else "")
         + (" --compile" if a.compile else "") + "`"), "",
        (f"Machine: {os.cpu_count()} CPU cores (Sapphire Rapids, AMX bf16) shared with other users: 1-minute load "
         f"average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end, so absolute numbers are noisy and "
         "only the ratios mean much. Matmul peak measured here (2048^3, best of 5): "
         + ", ".join(f"{t} thread(s) fp32 {p32:.0f} / bf16 {p16:.0f} GFLOP/s" for t, (p32, p16) in peaks.items())
         + f". Both loops run interleaved in one process, {a.repeats} repeats, medians quoted; wall time "
         f"{time.time() - t0:.0f} s."), "",
        ("Reference: plain eager fp32 (contiguous NCHW, hooks with separate mean/var, per-image RandomResizedCrop, "
         "Adam (0.5, 0.9), cosine lr). distillset: `recover.engine.Engine.optimise` with the default config "
         "(autocast auto, channels-last). Final loss: CE + BN (rms-normalised, first BN x10) of the final images, "
         "fp32, no augmentation, evaluated identically for both. Ratio: of the medians; paired: median of the "
         "per-repeat ratios (each repeat runs both loops back to back)."), "",
        ("compiled: the same engine with `compile: true` (its teacher through torch.compile, as a run of at least "
         "`compile_min_steps` steps does); its compile time is the first run's time beyond its steps, from an empty "
         "inductor cache." if a.compile else ""), "",
        ("| threads | backbone | images/batch | iters | GFLOP/iter | variant | img*it/s | vs reference | paired | "
         "GFLOP/s | of the bf16 peak | final loss |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['threads']} | {r['arch']} | {r['images']} | {r['iters']} | {r['gflop_per_iter']:.1f} | "
        lines.append(head + f"reference (fp32) | {r['reference']['ips']:.1f} | 1.00x | | "
                     f"{r['reference']['gflops']:.0f} | {r['reference']['gflops'] / peaks[r['threads']][1]:.0%} | "
                     f"{r['reference']['loss']:.4f} |")
        for name in r["variants"]:
            v = r[name]
            note = f", compile {r['compile_s']:.0f} s" if name == "compiled" else ""
            lines.append(head + f"{name} ({r['autocast'].replace('torch.', '')}{note}) | {v['ips']:.1f} | "
                         f"**{v['ips'] / r['reference']['ips']:.2f}x** | {v['paired']:.2f}x | {v['gflops']:.0f} | "
                         f"{v['peak']:.0%} | {v['loss']:.4f} |")
    lines += ["", "Per-repeat img*it/s: " + "; ".join(
        f"{r['threads']} thr {r['arch']} " + ", ".join(
            f"{k} {[round(v, 1) for v in r[k]['all']]}" for k in ("reference", *r["variants"]))
        for r in results), ""]
    publish(a.out, lines)


if __name__ == "__main__":
    main()
