"""One table of the throughputs that matter, for a GPU check (``benchmarks/device_check.sh``) or a CPU smoke (``--tiny``).

Rows (each timed after a warm-up, so compilation is reported apart and never inside a throughput):

- recover: SRe2L on a torchvision ResNet-18 (224 px, batch 100): the plain eager fp32 loop of
  ``benchmarks/recover_throughput.py`` (CE + BN hooks, Adam, per-image random crops + flips) against distillset's
  ``Engine.optimise`` (bf16 autocast, channels-last, torch.compile on a GPU); images x iterations per second and the
  ratio;
- relabel: soft labels (``relabel.softlabels.generate``), crops labelled per second;
- RDED selection: distilled images per second (``Engine.optimise`` with method rded);
- DM and DC: ms per step at the recipes' settings (ConvNet-3, IPC 10, batch_real 256), the plain reference of
  ``benchmarks/matching_perf.py`` against the objective (eager and compiled);
- student training: ConvNet-3 epochs per second on an IPC-10 set (``relabel.student.train_student``).

The data are random uint8 images (a speed check needs no real data, and the device machine has none). ``--tiny``
shrinks every size so the whole table runs on a CPU in seconds (the test suite runs it and checks every row).

    python benchmarks/device_check.py [--tiny] [--device cuda] [--out benchmarks/results/device_check.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.matching_perf import dc_reference, dm_reference, make_ctx, make_syn, objective_step
from benchmarks.recover_throughput import make_teacher, reference
from distillset.core.data import ImageSet
from distillset.core.runtime import Runtime, autocast_dtype
from distillset.recover.base import get
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import Engine, plan_units
from distillset.recover.real import RealData
from distillset.relabel.softlabels import RelabelConfig, generate
from distillset.relabel.student import StudentSpec, train_student
from distillset.squeeze.checkpoint import load_teacher

ROWS = ("recover reference (eager fp32)", "recover distillset", "relabel", "RDED selection", "DM step", "DC step",
        "student training")


@dataclass
class Sizes:
    """The sizes of one check: the GPU check's (the issue's) or the tiny CPU smoke's."""

    arch: str = "tv:resnet18"
    size: int = 224
    batch: int = 100
    iters: int = 20
    repeats: int = 3
    relabel_images: int = 1000
    relabel_epochs: int = 2
    rded_ipc: int = 10
    real_per_class: int = 500
    width: int = 128
    batch_real: int = 256
    ipc: int = 10
    student_epochs: int = 5
    classes: int = 10
    small: int = 32  # image size of the matching and student rows (CIFAR's)

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(arch="convnet3_bn", size=8, batch=10, iters=2, repeats=1, relabel_images=10, relabel_epochs=1,
                   rded_ipc=1, real_per_class=4, width=4, batch_real=4, ipc=1, student_epochs=1, classes=2,
                   small=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def random_set(n_per_class: int, size: int, classes: int = 10, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_per_class * classes, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(classes).repeat_interleave(n_per_class), [str(c) for c in range(classes)])


def check_recover(s: Sizes, device: torch.device, root: Path, compile_: bool) -> list[tuple]:
    path = make_teacher(root / "teacher", s.arch, 10, s.size)
    ref_teacher = load_teacher(path, device=device)
    labels = torch.arange(10, device=device).repeat_interleave(s.batch // 10)
    rt = Runtime(None, 0, 1, device)
    cfg = RecoverConfig(out=str(root / "recover"), teachers=[path], method="sre2l", ipc=s.batch // 10,
                        iterations=s.iters, classes_per_unit=0, log_every=s.iters, compile=compile_,
                        aug_options={"milestone": 0.0})
    engine = Engine(cfg, rt)
    unit = plan_units(10, s.batch // 10, 0, 0)[0]
    t = time.perf_counter()
    engine.optimise(unit)  # warm-up: compiles under compile_
    warm = time.perf_counter() - t
    init = torch.randn(len(labels), 3, s.size, s.size, device=device)
    reference(ref_teacher, init, labels, 1)
    ref, ours = [], []
    for _ in range(s.repeats):  # interleaved
        ref += timed(lambda: reference(ref_teacher, init, labels, s.iters), device, 1)
        sync(device)
        ours.append(engine.optimise(unit)[1]["seconds"])
    ips_ref, ips = s.batch * s.iters / statistics.median(ref), s.batch * s.iters / statistics.median(ours)
    how = f"autocast {engine.autocast}, channels-last {cfg.channels_last}, compile {compile_} (first run {warm:.0f} s)"
    return [(ROWS[0], f"{ips_ref:.1f} img*it/s", f"{s.arch}, {s.size} px, batch {s.batch}"),
            (ROWS[1], f"{ips:.1f} img*it/s", f"{ips / ips_ref:.2f}x the reference; {how}")]


def check_relabel(s: Sizes, device: torch.device, root: Path) -> tuple:
    teacher = load_teacher(str(root / "teacher"), device=device)
    images = random_set(s.relabel_images // 10, s.size)
    cfg = RelabelConfig(epochs=s.relabel_epochs, batch_size=min(256, s.relabel_images))
    generate(images, [teacher], cfg, device, range(1), show_progress=False)
    sec = statistics.median(timed(lambda: generate(images, [teacher], cfg, device, range(s.relabel_epochs),
                                                   show_progress=False), device, s.repeats))
    detail = f"{len(images)} images x {s.relabel_epochs} epochs, teacher {s.arch}"
    return ROWS[2], f"{len(images) * s.relabel_epochs / sec:.0f} crops/s", detail


def check_rded(s: Sizes, device: torch.device, root: Path) -> tuple:
    data = root / "real.npz"
    train = random_set(s.real_per_class, s.size, seed=1)
    nhwc = train.images.permute(0, 2, 3, 1).numpy()  # the npz source's layout
    np.savez(data, x_train=nhwc, y_train=train.labels.numpy(), x_test=nhwc[:10], y_test=train.labels[:10].numpy())
    cfg = RecoverConfig(out=str(root / "rded"), data=f"npz:{data}", teachers=[str(root / "teacher")], method="rded",
                        ipc=s.rded_ipc, iterations=0, classes_per_unit=0, options={"pool": s.real_per_class})
    engine = Engine(cfg, Runtime(None, 0, 1, device))
    unit = plan_units(10, s.rded_ipc, 0, 0)[0]
    engine.optimise(unit)
    sec = statistics.median(timed(lambda: engine.optimise(unit), device, s.repeats))
    return ROWS[3], f"{10 * s.rded_ipc / sec:.1f} images/s", f"IPC {s.rded_ipc}, {s.real_per_class} per class scored"


def check_matching(s: Sizes, device: torch.device, method: str, compile_: bool) -> tuple:
    real = RealData(random_set(max(s.batch_real, s.real_per_class), s.small, seed=2), device)
    classes = 1 if method == "dm" else s.classes
    dtype = autocast_dtype("auto", device)
    base = {"batch_real": s.batch_real, "width": s.width, "compile_min_steps": 0}
    variants = {"reference": ({**base}, dm_reference if method == "dm" else dc_reference, None),
                "eager": (base, objective_step, dtype)}
    if compile_:
        variants["compiled"] = ({**base, "compile_min_steps": 1}, objective_step, dtype)

    def one(options, fn, dt):
        obj = get("objective", method).from_options(**options)
        ctx = make_ctx(real, classes, s.ipc, dt, total_steps=100, device=device)
        obj.setup(ctx)
        syn = make_syn(ctx, classes, s.ipc)
        if method == "dc":  # the timed step trains the network (inner loop), then matches
            from distillset.recover.objectives._matching import Normalize

            obj.schedule.network(syn, ctx, Normalize(ctx).to(device))
        sync(device)
        t = time.perf_counter()
        fn(obj, syn, ctx).backward()
        sync(device)
        return time.perf_counter() - t

    times = {k: [] for k in variants}
    for k, v in variants.items():
        one(*v)  # warm-up (compiles)
    for _ in range(s.repeats):
        for k, v in variants.items():
            times[k].append(one(*v))
    ms = {k: 1000 * statistics.median(t) for k, t in times.items()}
    best = min((k for k in ms if k != "reference"), key=ms.get)
    unit = "class-step" if method == "dm" else f"engine step (inner loop + {classes} classes)"
    detail = ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
    return (ROWS[4] if method == "dm" else ROWS[5], f"{ms[best]:.0f} ms / {unit}",
            f"{detail}; best {ms['reference'] / ms[best]:.2f}x the reference")


def check_student(s: Sizes, device: torch.device) -> tuple:
    train, test = random_set(s.ipc, s.small, seed=3), random_set(2, s.small, seed=4)
    spec = StudentSpec(arch="convnet3", model_kwargs={"width": s.width}, epochs=s.student_epochs, protocol="matching",
                       batch_size=256)
    train_student(train, test, StudentSpec(**{**spec.__dict__, "epochs": 1}), [0.5] * 3, [0.25] * 3, 0, device)
    sec = statistics.median(timed(lambda: train_student(train, test, spec, [0.5] * 3, [0.25] * 3, 0, device),
                                  device, s.repeats))
    detail = f"ConvNet-3 width {s.width}, {len(train)} images (IPC {s.ipc}), matching protocol"
    return ROWS[6], f"{s.student_epochs / sec:.2f} epochs/s", detail


def run(tiny: bool, device: torch.device, compile_: bool | None = None, on_row=None) -> list[tuple]:
    """All rows of the table: ``(check, result, details)``; ``on_row(row)`` is called as each is measured, so a
    check cut short by its time limit still shows the rows it finished."""
    s = Sizes.tiny() if tiny else Sizes()
    compile_ = (device.type == "cuda") if compile_ is None else compile_
    rows: list[tuple] = []

    def add(*new: tuple) -> None:
        for row in new:
            rows.append(row)
            if on_row is not None:
                on_row(row)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        add(*check_recover(s, device, root, compile_))
        add(check_relabel(s, device, root))
        add(check_rded(s, device, root))
        add(check_matching(s, device, "dm", compile_))
        add(check_matching(s, device, "dc", compile_))
        add(check_student(s, device))
    return rows


def table(rows: list[tuple], tiny: bool, device: torch.device, seconds: float) -> list[str]:
    """The printed table (markdown): a title naming the device, then one line per check."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    title = f"# Device check ({'tiny' if tiny else 'full'}, {name}, torch {torch.__version__}, {seconds:.0f} s)"
    return [title, "", "| check | result | details |", "|---|---|---|", *(f"| {c} | {r} | {d} |" for c, r, d in rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole table in seconds on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", type=int, default=-1, help="1/0: torch.compile on/off (default: on for cuda)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    device = torch.device(a.device)
    t0 = time.time()
    rows = run(a.tiny, device, None if a.compile < 0 else bool(a.compile),
               on_row=lambda r: print("measured: " + " | ".join(r), flush=True))
    lines = table(rows, a.tiny, device, time.time() - t0)
    print("\n".join(lines), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
