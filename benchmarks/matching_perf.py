"""The matching methods' step speed: DM, DC, DSA and MTT (with TESLA) against a plain reference, interleaved in one run.

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

MTT's step is one loss evaluation of ``recipes/mtt_cifar10.yaml`` scaled to the benchmark (IPC 10, all 100 images per
student step, ``expert_epochs`` 2, ``--syn-steps`` student steps, DSA) plus its backward, against one expert
trajectory of ConvNet-3 (width ``--width``) recorded here on the first ``--mtt-max-train`` training images and cached
under ``--work`` (a rerun with the same settings reuses it). Its variants: ``reference`` (the published code's loop:
the student as a network of one flat parameter vector, SGD steps with ``create_graph=True``, the normalised
distance, a host sync), ``eager`` (the ``mtt`` objective's unrolled path) and ``tesla`` (the objective with
``tesla: true``: the same gradient by an adjoint pass, one step's graph at a time). All three are fp32 (the objective
does not autocast). There is no compiled MTT variant: the unroll differentiates through the student's gradients
(double backward), which torch.compile's graphs do not support. TESLA recomputes every student step, so its GFLOP/s
(the reference's FLOPs over its time) is the useful rate, not the executed one; in exchange its last column's peak of
the tensors autograd saves for backward (measured in the warm-up step) does not grow with the student steps.

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
from distillset.core.config import fingerprint
from distillset.core.data import Source
from distillset.core.runtime import autocast_dtype, get_runtime
from distillset.generative.prior import SavedTensorMeter
from distillset.recover.base import Context, get
from distillset.recover.objectives._matching import Normalize, class_positions, dc_loops
from distillset.recover.objectives.dc import gradient_distance
from distillset.recover.params import PixelSet
from distillset.recover.real import RealData
from distillset.squeeze.trajectories import NON_SEMANTIC, TrajectoryConfig
from distillset.squeeze.trajectories import run as record_experts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_ctx(real, classes: int, ipc: int, dtype, total_steps: int, seed: int = 0,
             device: torch.device | None = None, **extra) -> Context:
    """A unit's context; ``extra`` are further Context fields (MTT's: the experts' mean/std, the augmentation)."""
    device = device or torch.device("cpu")
    cls = torch.arange(classes).repeat_interleave(ipc).to(device)
    return Context(device=device, classes=cls, num_classes=10, image_shape=tuple(real.images.shape[1:]),
                   generator=torch.Generator().manual_seed(seed), real=real, autocast_dtype=dtype, ipc=ipc,
                   total_steps=total_steps, **extra)


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


def mtt_reference(obj, syn, ctx: Context) -> torch.Tensor:
    """MTT's loss as the published loop writes it: the student starts at the expert's epoch ``t``, takes
    ``syn_steps`` SGD steps (step size the learnable ``syn_lr``) on batches of the DSA-augmented synthetic images,
    each gradient taken with ``create_graph=True`` so the whole unroll stays differentiable, then the distance to the
    expert ``expert_epochs`` later over the distance the expert travelled; fp32, a host sync.

    It draws from ``ctx.generator`` in the objective's order (expert, start epoch, then per step: a permutation when
    the previous one is used up, the DSA parameters), so it replays the objective's seeds. The network of a flat
    parameter vector, the experts' input transform and the start window are the objective's (set up by it).
    """
    ex = obj.experts
    e = int(torch.randint(len(ex.trajectories), (1,), generator=ctx.generator))
    lo, hi = obj.start_window(ctx)
    start = int(torch.randint(lo, hi, (1,), generator=ctx.generator))
    theta0 = ex.trajectories[e][start].to(ctx.device)
    target = ex.trajectories[e][start + obj.expert_epochs].to(ctx.device)
    x_all = syn.render()
    n = len(x_all)
    student = theta0.clone().requires_grad_(True)
    order: list[torch.Tensor] = []
    for _ in range(obj.syn_steps):
        if not order:
            order = list(torch.randperm(n, generator=ctx.generator).split(obj.batch_syn or n))
        idx = order.pop(0).to(ctx.device)
        x = ctx.augment.apply(x_all[idx], ctx.augment.sample(len(idx), ctx), ctx)
        ce = F.cross_entropy(obj.net(student, obj.norm(x)), syn.labels[idx])
        grad = torch.autograd.grad(ce, student, create_graph=True)[0]
        student = student - obj.syn_lr * grad
    loss = ((student - target) ** 2).sum() / ((theta0 - target) ** 2).sum()
    float(loss.detach())  # the published loop logs the loss every iteration
    return loss


def objective_step(obj, syn, ctx: Context) -> torch.Tensor:
    return obj.loss(syn, ctx)


# ------------------------------------------------------------------------------------------------------ measuring


class Variant:
    """One way to run a method's step: a fresh context (same seeds every time), its objective, the step function.

    ``ctx_extra`` are further Context fields; ``meter`` measures the peak of autograd's saved tensors in the warm-up
    step (MTT: the memory TESLA trades time for; the hooks would slow the timed steps and break compiled graphs).
    """

    def __init__(self, name: str, method: str, options: dict, fn, real, a, dtype, warm_steps: int,
                 ctx_extra: dict | None = None, meter: bool = False):
        self.name, self.method, self.options, self.fn = name, method, options, fn
        self.real, self.a, self.dtype, self.warm_steps = real, a, dtype, warm_steps
        self.ctx_extra, self.meter = ctx_extra or {}, meter
        self.precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat", "bf")
        self.times: list[float] = []
        self.loss = float("nan")
        self.compile_s = 0.0
        self.saved_peak = 0

    def fresh(self):
        a = self.a
        obj = get("objective", self.method).from_options(**self.options)
        ctx = make_ctx(self.real, a.classes_of[self.method], a.ipc, self.dtype, total_steps=a.total_steps,
                       **self.ctx_extra)
        obj.setup(ctx)
        syn = make_syn(ctx, a.classes_of[self.method], a.ipc)
        if self.warm_steps:  # DC: step 1 draws the network; step 2 (timed) trains it, then matches
            obj.schedule.network(syn, ctx, Normalize(ctx))
        return obj, syn, ctx

    def step(self, warm_up: bool = False) -> float:
        obj, syn, ctx = self.fresh()
        meter = SavedTensorMeter() if warm_up and self.meter else None
        t = time.perf_counter()
        with meter or contextlib.nullcontext():
            loss = self.fn(obj, syn, ctx)
            loss.backward()
        dt = time.perf_counter() - t
        self.loss = float(loss.detach())
        if meter is not None:
            self.saved_peak = meter.peak
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


def matching_variants(method: str, real, a) -> list[Variant]:
    """DM, DC, DSA: the plain reference, the objective eager (bf16 where the CPU has AMX) and compiled."""
    dtype = autocast_dtype("auto", torch.device("cpu"))
    base = {"batch_real": a.batch_real, "width": a.width, "compile_min_steps": 0}
    ref_fn, warm = {"dm": (dm_reference, 0), "dc": (dc_reference, 1), "dsa": (dc_reference, 1)}[method]
    variants = [Variant("reference", method, base, ref_fn, real, a, None, warm),
                Variant("eager", method, base, objective_step, real, a, dtype, warm)]
    if a.compile:
        variants.append(Variant("compiled", method, {**base, "compile_min_steps": 1}, objective_step, real, a, dtype,
                                warm))
    return variants


def mtt_experts(a) -> str:
    """Record the benchmark's expert trajectory (once: a folder per setting, which the recorder resumes/skips)."""
    cfg = TrajectoryConfig(data=a.data, arch="convnet3", model_kwargs={"width": a.width}, num_experts=1,
                           epochs=a.mtt_epochs, max_train=a.mtt_max_train, augment="dsa", eval_test=False)
    # the recorder refuses a folder written with another config: name the folder by the config's fingerprint
    cfg.out = str(Path(a.work) / f"experts_convnet3_w{a.width}_{fingerprint(cfg, NON_SEMANTIC)[:12]}")
    t = time.perf_counter()
    summary = record_experts(cfg, get_runtime())
    a.mtt_note = (f"MTT expert: 1 x ConvNet-3 (width {a.width}, instance norm), {a.mtt_epochs} epochs of SGD (lr 0.01, "
                  f"batch 256, DSA) on the first {a.mtt_max_train} training images, in {cfg.out} ("
                  + (f"recorded in {time.perf_counter() - t:.0f} s" if summary["trained"] else
                     "recorded by an earlier run, reused") + ").")
    return cfg.out


def mtt_variants(real, a) -> list[Variant]:
    """MTT: the plain unroll, the objective's unrolled path and TESLA's adjoint path, all fp32 (see the docstring)."""
    base = {"buffer": mtt_experts(a), "expert_epochs": 2, "syn_steps": a.syn_steps, "max_start_epoch": 20,
            "batch_syn": a.batch_syn, "lr_teacher": 0.01, "lr_lr": 1e-5}
    probe = get("objective", "mtt").from_options(**base)
    ref = probe.input_reference()  # the engine's choice: synthetic pixels in the experts' input space
    extra = {"mean": ref["mean"], "std": ref["std"], "augment": get("augmentation", "dsa").from_options()}
    kw = {"real": real, "a": a, "dtype": None, "warm_steps": 0, "ctx_extra": extra, "meter": True}
    return [Variant("reference", "mtt", base, mtt_reference, **kw),
            Variant("eager", "mtt", base, objective_step, **kw),
            Variant("tesla", "mtt", {**base, "tesla": True}, objective_step, **kw)]


def run_method(method: str, real, a, peaks: dict) -> tuple[list[str], list[str]]:
    variants = mtt_variants(real, a) if method == "mtt" else matching_variants(method, real, a)
    for v in variants:  # warm-up (the compiled variant's first calls compile; MTT's meter its saved tensors)
        t = time.perf_counter()
        v.step(warm_up=True)
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
    unit = {"dm": "class-step", "mtt": f"MTT step: {a.syn_steps} student steps + the backward"}.get(method,
                                                                                                     "engine step")
    rows = []
    for v in variants:
        t = statistics.median(v.times)
        gf = flops / t / 1e9
        pk = peaks["fp32"] if v.dtype is None else peaks["bf16"]
        extra = ""
        if v.name == "compiled":
            eager_t = statistics.median(variants[1].times)
            pay = v.compile_s / max(1e-9, eager_t - t) if eager_t > t else float("inf")
            extra = f"compile {v.compile_s:.0f} s, paid back after {pay:.0f} steps"
        if v.meter:
            extra = f"autograd saved tensors peak {v.saved_peak / 2 ** 20:.0f} MiB"
        rows.append(f"| {method} | {v.name} | {v.precision} | {1000 * t:.0f} | {gf:.0f} | {100 * gf / pk:.0f} % | "
                    f"**{t_ref / t:.2f}x** | {v.loss:.4f} | {extra} |")
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
    p.add_argument("--syn-steps", type=int, default=20, help="MTT: student steps per loss evaluation")
    p.add_argument("--batch-syn", type=int, default=0, help="MTT: images per student step (0 = all, the recipe's)")
    p.add_argument("--mtt-max-train", type=int, default=2000, help="MTT: the expert trains on the first N images")
    p.add_argument("--mtt-epochs", type=int, default=3,
                   help="MTT: expert epochs recorded (expert_epochs 2 needs at least 3 for two start epochs)")
    p.add_argument("--work", default="/tmp/distillset_bench/matching_perf", help="MTT: where the expert is cached")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "matching_perf.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.classes_of = {"dm": 1, "dc": a.classes, "dsa": a.classes, "mtt": 10}  # MTT's unit is the whole set
    a.mtt_note = ""
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
               f"--repeats {a.repeats} --threads {a.threads} --compile {a.compile}"
               + (f" --syn-steps {a.syn_steps} --batch-syn {a.batch_syn} --mtt-max-train {a.mtt_max_train} "
                  f"--mtt-epochs {a.mtt_epochs}" if "mtt" in a.methods.split(",") else "") + "`")
    machine = (f"Machine: {os.cpu_count()}-core CPU, shared; torch {torch.__version__}; {a.threads} threads; matmul "
               f"peak measured in this run: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; load "
               f"average {load0[0]:.1f} at the start, {load1[0]:.1f} now.")
    header = ("| method | variant | precision | ms / step (median) | GFLOP/s | of its matmul peak | vs reference "
              "| loss | |")
    lines = ["# Matching methods: step time against a plain reference (issue 17)", "", command, "", machine, "",
             *([a.mtt_note, ""] if a.mtt_note else []), header, "|---|---|---|---|---|---|---|---|---|", *rows, "",
             *prof]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
