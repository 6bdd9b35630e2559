"""The matching methods' step speed: DM, DC, DSA (and MTT) against a plain reference, interleaved in one run.

Per method, one step at the recipes' settings (ConvNet-3 width 128 on the CIFAR-10 subset, IPC 10, batch_real 256):

- ``reference``: a plain, straightforward implementation of the same step written here (fp32 eager, the
  networks' modules, class by class, one DSA call per batch, ``float(loss)`` every step): the code path before
  issue 17, kept so that before/after is one interleaved run;
- ``eager``: the objective as `recover` runs it without compiling (bf16 autocast where the CPU has AMX, one DSA op
  for both batches of a comparison, no host syncs);
- ``compiled``: the same with ``compile_min_steps: 1`` (the networks' passes as one torch.compile'd graph of their
  weights; the recipes' long runs compile by default). Its compile time is reported apart, with the steps it takes
  to pay it back.

Every variant replays the same seeds (network, real batches, DSA draws), so the losses must agree (bf16 within its
rounding). Reported: ms per step (median over interleaved repeats), achieved GFLOP/s (torch's FlopCounterMode on the
reference step) against the fp32 and bf16 matmul peaks measured in the same run, the ratio to the reference, the
loss, and a per-op profile (torch.profiler) of one step of each variant. DM's step is one class-step (its recipe's
units are single classes); DC's is one engine step: the inner loop (50 epochs of the network on the 100 synthetic
images) plus the matching of the 10 classes.

    OMP_NUM_THREADS=2 python benchmarks/matching_perf.py [--methods dm,dc,dsa,mtt --repeats 5 --threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recover_throughput import matmul_peak
from distillset.core.data import Source
from distillset.core.runtime import autocast_dtype
from distillset.recover.base import Context, get
from distillset.recover.objectives._matching import Normalize, class_positions, dc_loops
from distillset.recover.objectives.dc import gradient_distance
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_ctx(real, classes: int, ipc: int, dtype, total_steps: int, seed: int = 0,
             device: torch.device | None = None) -> Context:
    device = device or torch.device("cpu")
    cls = torch.arange(classes).repeat_interleave(ipc).to(device)
    return Context(device=device, classes=cls, num_classes=10, image_shape=tuple(real.images.shape[1:]),
                   generator=torch.Generator().manual_seed(seed), real=real, autocast_dtype=dtype, ipc=ipc,
                   total_steps=total_steps)


def make_syn(ctx: Context, classes: int, ipc: int) -> PixelSet:
    return PixelSet.from_options(ctx.classes, torch.arange(ipc).repeat(classes), ctx.image_shape, 0, ctx, init="real")


# ------------------------------------------------------------------------------------------- the plain references


def dm_reference(obj, syn, ctx: Context) -> torch.Tensor:
    """DM's class-step as first written: fp32, the module forward, one DSA call per batch, a host sync."""
    net = obj.source.sample(ctx)
    for p in net.parameters():
        p.requires_grad_(False)
    norm, aug = Normalize(ctx).to(ctx.device), obj.augmenter.resolve(ctx)
    total = 0
    for c, pos in class_positions(syn.labels):
        real = ctx.real.sample(c, obj.batch_real, ctx.generator)
        params = aug.sample(1, ctx)
        real, x_syn = aug.apply(real, params, ctx), aug.apply(syn.render(pos), params, ctx)
        with torch.no_grad():
            mu_real = net.embed(norm(real)).mean(0)
        total = total + ((mu_real - net.embed(norm(x_syn)).mean(0)) ** 2).sum()
    float(total.detach())  # the per-step host sync the first versions had
    return total


def dc_reference(obj, syn, ctx: Context) -> torch.Tensor:
    """DC's engine step as first written: the inner loop (fp32 SGD epochs on the synthetic set) on the unit's
    network, then class-by-class gradient matching in fp32, one DSA call per batch, a host sync."""
    st = ctx.state
    outer, inner = obj.schedule.loops(ctx)
    norm, aug = Normalize(ctx).to(ctx.device), obj.augmenter.resolve(ctx)
    if st.get("net") is None or st["k"] >= outer:
        st["net"], st["k"] = obj.source.sample(ctx), 0
    elif st["k"] > 0 and inner > 0:
        net = st["net"]
        for p in net.parameters():
            p.requires_grad_(True)
        x = syn.render().detach().float()
        opt = torch.optim.SGD(net.parameters(), lr=obj.cfg.lr_net)
        net.train()
        for _ in range(inner):
            order = torch.randperm(len(x), generator=ctx.generator).to(x.device)
            for s in range(0, len(x), obj.cfg.batch_train):
                idx = order[s:s + obj.cfg.batch_train]
                xb = x[idx] if aug is None else aug.apply(x[idx], aug.sample(1, ctx), ctx)
                loss = F.cross_entropy(net(norm(xb)), syn.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    st["k"] += 1
    net = st["net"]
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    total = 0
    for c, pos in class_positions(syn.labels):
        real = ctx.real.sample(c, obj.batch_real, ctx.generator)
        x_syn = syn.render(pos)
        if aug is not None:
            pa = aug.sample(1, ctx)
            real, x_syn = aug.apply(real, pa, ctx), aug.apply(x_syn, pa, ctx)
        y = torch.full((len(real),), c, device=real.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(norm(real)), y), params)]
        g_syn = torch.autograd.grad(F.cross_entropy(net(norm(x_syn)), syn.labels[pos]), params, create_graph=True)
        total = total + gradient_distance(g_real, g_syn, obj.metric)
    for p in params:
        p.requires_grad_(False)
    float(total.detach())  # the per-step host sync the first versions had
    return total


def objective_step(obj, syn, ctx: Context) -> torch.Tensor:
    return obj.loss(syn, ctx)


# ------------------------------------------------------------------------------------------------------ measuring


class Variant:
    """One way to run a method's step: a fresh context (same seeds every time), its objective, the step function."""

    def __init__(self, name: str, method: str, options: dict, fn, real, a, dtype, warm_steps: int):
        self.name, self.method, self.options, self.fn = name, method, options, fn
        self.real, self.a, self.dtype, self.warm_steps = real, a, dtype, warm_steps
        self.times: list[float] = []
        self.loss = float("nan")
        self.compile_s = 0.0

    def fresh(self):
        a = self.a
        obj = get("objective", self.method).from_options(**self.options)
        ctx = make_ctx(self.real, a.classes_of[self.method], a.ipc, self.dtype, total_steps=a.total_steps)
        obj.setup(ctx)
        syn = make_syn(ctx, a.classes_of[self.method], a.ipc)
        if self.warm_steps:  # DC: step 1 draws the network; step 2 (timed) trains it, then matches
            obj.schedule.network(syn, ctx, Normalize(ctx))
        return obj, syn, ctx

    def step(self) -> float:
        obj, syn, ctx = self.fresh()
        t = time.perf_counter()
        loss = self.fn(obj, syn, ctx)
        loss.backward()
        dt = time.perf_counter() - t
        self.loss = float(loss)
        return dt


def profile_table(variant: Variant, rows: int, flops: FlopCounterMode | None = None) -> list[str]:
    obj, syn, ctx = variant.fresh()
    with profile(activities=[ProfilerActivity.CPU]) as prof, (flops or contextlib.nullcontext()):
        variant.fn(obj, syn, ctx).backward()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    out = [f"| {e.key} | {e.self_cpu_time_total / 1000:.1f} | {100 * e.self_cpu_time_total / total:.0f} % | "
           f"{e.count} |" for e in ev[:rows]]
    return [f"Profile of one `{variant.name}` step ({variant.method}):", "",
            "| op | self CPU ms | share | calls |", "|---|---|---|---|", *out, ""]


def run_method(method: str, real, a, peaks: dict) -> tuple[list[str], list[str]]:
    dtype = autocast_dtype("auto", torch.device("cpu"))
    base = {"batch_real": a.batch_real, "width": a.width, "compile_min_steps": 0}
    ref_fn, warm = {"dm": (dm_reference, 0), "dc": (dc_reference, 1), "dsa": (dc_reference, 1)}[method]
    variants = [Variant("reference", method, base, ref_fn, real, a, None, warm),
                Variant("eager", method, base, objective_step, real, a, dtype, warm)]
    if a.compile:
        variants.append(Variant("compiled", method, {**base, "compile_min_steps": 1}, objective_step, real, a, dtype,
                                warm))
    for v in variants:  # warm-up (the compiled variant's first calls compile)
        t = time.perf_counter()
        v.step()
        v.compile_s = time.perf_counter() - t
    for _ in range(a.repeats):  # interleaved: every variant sees the same machine load
        for v in variants:
            v.times.append(v.step())
    ref = variants[0]
    fc = FlopCounterMode(display=False)
    prof = profile_table(ref, a.profile_rows, fc)  # the FLOPs of the reference step, counted while profiling it
    for v in variants[1:]:
        prof += profile_table(v, a.profile_rows)
    flops = fc.get_total_flops()
    t_ref = statistics.median(ref.times)
    unit = "class-step" if method == "dm" else "engine step"
    rows = []
    for v in variants:
        t = statistics.median(v.times)
        gf = flops / t / 1e9
        pk = peaks["bf16"] if v.name != "reference" and dtype is not None else peaks["fp32"]
        extra = ""
        if v.name == "compiled":
            eager_t = statistics.median(variants[1].times)
            pay = v.compile_s / max(1e-9, eager_t - t) if eager_t > t else float("inf")
            extra = f"compile {v.compile_s:.0f} s, paid back after {pay:.0f} steps"
        rows.append(f"| {method} | {v.name} | {'fp32' if v.name == 'reference' or dtype is None else 'bf16'} | "
                    f"{1000 * t:.0f} | {gf:.0f} | {100 * gf / pk:.0f} % | **{t_ref / t:.2f}x** | {v.loss:.4f} | "
                    f"{extra} |")
    rows.append(f"| {method} | (FLOPs per {unit}) | | | {flops / 1e9:.1f} GFLOP | | | | |")
    return rows, prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"npz:{SHARED / 'cifar10.npz'}")
    p.add_argument("--methods", default="dm,dc,dsa")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--classes", type=int, default=10, help="classes of a DC/DSA unit (DM's unit is one class)")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", type=int, default=1, help="1: also time the compiled variant")
    p.add_argument("--profile-rows", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "matching_perf.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.classes_of = {"dm": 1, "dc": a.classes, "dsa": a.classes}
    outer, _ = dc_loops(a.ipc)
    a.total_steps = 10 * outer  # not a multiple-of-outer boundary at step 2, so DC's timed step trains the network
    real = RealData(Source(a.data).load("train"))
    load0 = os.getloadavg()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows, prof = [], []
    for m in a.methods.split(","):
        r, pr = run_method(m, real, a, peaks)
        rows += r
        prof += pr
        write(a, peaks, load0, rows, prof)  # after every method, so a long run cut short keeps what it measured


def write(a, peaks: dict, load0: tuple, rows: list[str], prof: list[str]) -> None:
    load1 = os.getloadavg()
    command = (f"Command: `OMP_NUM_THREADS={a.threads} python benchmarks/matching_perf.py --methods {a.methods} "
               f"--ipc {a.ipc} --classes {a.classes} --batch-real {a.batch_real} --width {a.width} "
               f"--repeats {a.repeats} --threads {a.threads} --compile {a.compile}`")
    machine = (f"Machine: {os.cpu_count()}-core CPU, shared; torch {torch.__version__}; {a.threads} threads; matmul "
               f"peak measured in this run: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; load "
               f"average {load0[0]:.1f} at the start, {load1[0]:.1f} now.")
    header = ("| method | variant | precision | ms / step (median) | GFLOP/s | of its matmul peak | vs reference "
              "| loss | |")
    lines = ["# Matching methods: step time against a plain reference (issue 17)", "", command, "", machine, "",
             header, "|---|---|---|---|---|---|---|---|---|", *rows, "", *prof]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
