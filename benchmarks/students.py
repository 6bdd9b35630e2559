"""Student training throughput: a plain loop written here vs distillset's students, one at a time and in cohorts.

Two settings, each the students of one evaluation:

* ``digits``: the demo's students (``recipes/digits.yaml``): ConvNet-2 (BN, width 64) on 10 real 8x8 digits (IPC 1),
  SRe2L protocol (AdamW, RandomResizedCrop 0.5-1, no flip), batch 64 (so one step of 10 images per epoch), 12
  students (the demo's 3 seeds x 2 sets x 2 label modes, here 12 seeds with hard labels).
* ``cifar``: the issue's ConvNet-3 (instance norm, width 128) on 100 CIFAR-10 images at 32 px (the test asset),
  matching protocol (SGD, DSA), batch 64.

Variants, run interleaved (reference, lone, lone fp32, cohort, cohort fp32; repeated) so the other jobs on a shared
machine slow all alike:

* ``reference``: the straightforward loop written below: eager fp32, one student at a time, per-step augmentation
  (the library's crop and DSA ops), torch's default (single-tensor) optimiser on a CPU; the same protocol and
  hyper-parameters.
* ``lone``: ``relabel.student.fit_student`` (autocast ``auto``: bf16 on CPUs with AMX) per student; ``lone fp32``
  the same with autocast off.
* ``cohort``: ``relabel.cohort.fit_students`` (all students as one wide network); ``cohort fp32`` without autocast.

Reported: seconds per student-epoch (median over repeats), speed-up over the reference (ratio of medians), achieved
GFLOP/s (FLOPs of one student's forward + backward per image, counted by torch's FlopCounterMode, times images seen,
over the wall time) against the fp32 and bf16 matmul peaks measured here, and the students' mean test top-1 (equal
accuracy is the condition of any speed-up). A torch.profiler table of one cohort step and one lone step follows.

    python benchmarks/students.py [--settings digits,cifar --repeats 3 --epochs-digits 100 --epochs-cifar 6]

``--evaluate DISTILLED --before REV`` instead times the demo's ``evaluate`` stage (200 epochs, 3 students, crops
0.5-1, no flip, as ``recipes/digits.yaml``) on a distilled set, interleaved: before = the student code of git
revision REV (``relabel/student.py`` read with ``git show``), one student at a time; after = this tree (cohorts).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recover_throughput import matmul_peak
from distillset.core.data import ImageSet, Source
from distillset.core.runtime import autocast_dtype
from distillset.relabel.cohort import fit_students
from distillset.relabel.student import StudentSpec, fit_student
from distillset.squeeze.augment import affine_crop, sample_crops
from distillset.squeeze.data import channel_stats, evaluate_model
from distillset.squeeze.dsa import dsa_augment
from distillset.squeeze.models import create_model

ASSET = Path(__file__).resolve().parents[1] / "tests" / "assets" / "cifar10_small.npz"


def per_class(s: ImageSet, ipc: int) -> ImageSet:
    return s.subset(torch.cat([torch.nonzero(s.labels == c).flatten()[:ipc] for c in range(s.num_classes)]))


def setting(name: str, epochs: int) -> dict:
    if name == "digits":
        src = Source("digits")
        train, test = per_class(src.load("train"), 1), src.load("test")
        spec = StudentSpec("convnet_bn", {"width": 64}, epochs, "sre2l", 64, min_scale=0.5, flip=False)
        students = 12
    else:
        src = Source(f"npz:{ASSET}")
        train, test = per_class(src.load("train"), 10), src.load("test")
        spec = StudentSpec("convnet3", {"width": 128}, epochs, "matching", 64)
        students = 4
    mean, std = channel_stats(train.images)
    return {"name": name, "train": train, "test": test, "spec": spec, "students": students, "mean": mean, "std": std}


# ------------------------------------------------------------------------------------------- the plain reference


def reference_student(train: ImageSet, spec: StudentSpec, mean, std, seed: int) -> torch.nn.Module:
    """One student, written the straightforward way: eager fp32, the protocol's optimiser with torch's defaults."""
    torch.manual_seed(seed)
    model = create_model(spec.arch, train.num_classes, train.image_shape[0], train.image_shape[-1],
                         **spec.model_kwargs)
    n = len(train)
    steps = math.ceil(n / spec.batch_size)
    total = steps * spec.epochs
    if spec.protocol == "sre2l":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x_all, y_all = train.images.float() / 255, train.labels
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=g)
        for k in range(steps):
            if spec.protocol == "sre2l":
                lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / total))
            else:
                lr = 0.01 if step < total // 2 else 0.001
            for group in opt.param_groups:
                group["lr"] = lr
            j = perm[k * spec.batch_size:(k + 1) * spec.batch_size]
            x = x_all[j]
            if spec.protocol == "sre2l":  # RandomResizedCrop (+ flip), the library's batched geometry
                c = sample_crops(len(x), g, (spec.min_scale, 1.0), flip=spec.flip)
                x = affine_crop(x, c["cx"], c["cy"], c["w"], c["h"], c["flip"])
            else:
                x = dsa_augment(x, g)
            loss = F.cross_entropy(model((x - m) / s), y_all[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


# ------------------------------------------------------------------------------------------------ measurement


def flops_per_image(st: dict) -> float:
    """FLOPs of one student's forward + backward per training image (counted on one full batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    train, spec = st["train"], st["spec"]
    model = create_model(spec.arch, train.num_classes, train.image_shape[0], train.image_shape[-1],
                         **spec.model_kwargs)
    x = torch.rand(min(len(train), spec.batch_size), *train.image_shape)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    return float(fc.get_total_flops()) / len(x)


def run_variant(name: str, st: dict) -> tuple[float, list[float]]:
    """Train the setting's students with one variant: wall seconds and each student's test top-1."""
    train, test, spec, mean, std = st["train"], st["test"], st["spec"], st["mean"], st["std"]
    seeds = [1000 * i for i in range(st["students"])]
    fp32 = StudentSpec(**{**spec.__dict__, "autocast": "none"})
    t = time.perf_counter()
    if name == "lone compiled":  # the first repeat pays the compilation; later ones reuse it (one process)
        models = [fit_student(train, StudentSpec(**{**spec.__dict__, "compile": True}), mean, std, s, "cpu")
                  for s in seeds]
    elif name == "reference":
        models = [reference_student(train, spec, mean, std, s) for s in seeds]
    elif name.startswith("lone"):
        models = [fit_student(train, fp32 if name.endswith("fp32") else spec, mean, std, s, "cpu") for s in seeds]
    else:
        models = fit_students([(train, None, None)] * len(seeds), fp32 if name.endswith("fp32") else spec, mean,
                              std, seeds, "cpu")
    seconds = time.perf_counter() - t
    return seconds, [evaluate_model(m, test, mean, std, "cpu") for m in models]


VARIANTS = ("reference", "lone", "lone fp32", "cohort", "cohort fp32")


def profile_step(st: dict, cohort: bool, epochs: int, rows: int = 12) -> str:
    """torch.profiler's per-op table (self CPU time) of training for ``epochs`` (set-up included) after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    spec = StudentSpec(**{**st["spec"].__dict__, "epochs": epochs})
    seeds = [1000 * i for i in range(st["students"] if cohort else 1)]

    def once():
        if cohort:
            fit_students([(st["train"], None, None)] * len(seeds), spec, st["mean"], st["std"], seeds, "cpu")
        else:
            fit_student(st["train"], spec, st["mean"], st["std"], 0, "cpu")

    once()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        once()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
    return "\n".join(line for line in table.splitlines() if line.strip())


def evaluate_before_after(distilled: str, rev: str, repeats: int, out: str) -> None:
    """The demo's evaluate stage with REV's students (one at a time) and with this tree's (cohorts), interleaved."""
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    from distillset.relabel import evaluate as ev

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp())
    old_path = tmp / "student_before.py"
    old_path.write_text(subprocess.run(["git", "show", f"{rev}:relabel/student.py"], cwd=root, check=True,
                                       capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("student_before", old_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["student_before"] = old  # dataclasses look their module up while the file runs
    spec.loader.exec_module(old)
    now = ev.train_student
    times, tables, loads = {"before": [], "after": []}, {}, [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, spent in times.items():
            shutil.rmtree(tmp / "eval", ignore_errors=True)
            ev.train_student = old.train_student if name == "before" else now
            cfg = ev.EvaluateConfig(distilled=distilled, out=str(tmp / "eval"), epochs=200, students=3, min_scale=0.5,
                                    flip=False, batch_students=1 if name == "before" else 0)
            t = time.perf_counter()
            tables[name] = ev.format_summary(ev.run(cfg))
            spent.append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
            print(name, f"{spent[-1]:.1f} s", flush=True)
    ev.train_student = now
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    paired = statistics.median(x / y for x, y in zip(times["before"], times["after"]))
    lines = ["# The demo's evaluate stage, before and after", "",
             f"Command: `python benchmarks/students.py --evaluate {distilled} --before {rev} --repeats {repeats}`", "",
             f"1-minute load average {min(loads):.1f}-{max(loads):.1f} over the run; interleaved, medians.", "",
             "| | seconds (median) | per repeat |", "|---|---|---|",
             f"| before ({rev}, one at a time) | {b:.1f} | {[round(v, 1) for v in times['before']]} |",
             f"| after (cohorts) | {a:.1f} | {[round(v, 1) for v in times['after']]} |", "",
             f"Speed-up: {b / a:.2f}x (ratio of medians), {paired:.2f}x (median of paired ratios).", ""]
    for name, table in tables.items():
        lines += [f"{name}:", "", "```", table, "```", ""]
    Path(out).write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="digits,cifar")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs-digits", type=int, default=100)
    p.add_argument("--epochs-cifar", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="add the variant 'lone compiled' (torch.compile)")
    p.add_argument("--out", default="")
    p.add_argument("--evaluate", default="", help="a distilled-set folder: time the demo's evaluate stage instead")
    p.add_argument("--before", default="HEAD", help="with --evaluate: the git revision of the 'before' students")
    a = p.parse_args()
    results_dir = Path(__file__).parent / "results"
    if a.evaluate:
        evaluate_before_after(a.evaluate, a.before, a.repeats, a.out or str(results_dir / "students_evaluate.md"))
        return
    a.out = a.out or str(results_dir / "students.md")
    t0, load0 = time.time(), os.getloadavg()
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    amp = autocast_dtype("auto", torch.device("cpu"))
    print(f"threads {torch.get_num_threads()}; matmul peak fp32 {peak32:.0f}, bf16 {peak16:.0f} GFLOP/s; autocast "
          f"auto = {amp}", flush=True)
    results, profiles = [], {}
    for name in a.settings.split(","):
        st = setting(name, a.epochs_digits if name == "digits" else a.epochs_cifar)
        fl = flops_per_image(st)
        images = len(st["train"]) * st["spec"].epochs  # per student: every image once per epoch
        variants = (*VARIANTS, "lone compiled") if a.compile else VARIANTS
        times = {v: [] for v in variants}
        accs = {v: [] for v in variants}
        for r in range(a.repeats):
            for v in variants:
                sec, acc = run_variant(v, st)
                times[v].append(sec)
                accs[v] = acc  # the same seeds every repeat: the accuracies repeat too
                print(f"{name} repeat {r} {v}: {sec:.2f} s, top-1 {statistics.fmean(acc):.4f}", flush=True)
        for v in variants:
            med = statistics.median(times[v])
            gflops = fl * images * st["students"] / med / 1e9
            results.append({"setting": name, "variant": v, "seconds": med, "all": times[v],
                            "per_student_epoch": med / (st["students"] * st["spec"].epochs),
                            "speedup": statistics.median(times["reference"]) / med, "gflops": gflops,
                            "acc": statistics.fmean(accs[v]), "acc_std": statistics.pstdev(accs[v]),
                            "students": st["students"], "epochs": st["spec"].epochs, "gflop_image": fl / 1e9})
        pe = 20 if name == "digits" else 1  # 20 steps of the digits (one per epoch), 2 of the CIFAR students
        profiles[name] = {f"cohort, {pe} epoch(s)": profile_step(st, True, pe),
                          f"lone, {pe} epoch(s)": profile_step(st, False, pe)}
    load1 = os.getloadavg()
    # the best of the start and the end: other jobs on a shared machine lower a single measurement
    peak32, peak16 = max(peak32, matmul_peak(torch.float32)), max(peak16, matmul_peak(torch.bfloat16))
    lines = ["# Student training throughput", "",
             (f"Command: `python benchmarks/students.py --settings {a.settings} --repeats {a.repeats} "
              f"--epochs-digits {a.epochs_digits} --epochs-cifar {a.epochs_cifar}" + (" --compile" if a.compile else "")
             + "`"), "",
             (f"Machine: {os.cpu_count()} CPU cores shared with other jobs, {torch.get_num_threads()} intra-op "
              f"thread(s); 1-minute load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end. Matmul peak "
              f"measured here (2048^3, best of 5, at the start and at the end): fp32 {peak32:.0f}, bf16 {peak16:.0f} "
              f"GFLOP/s; autocast auto = {amp}. Variants interleaved, {a.repeats} repeats, medians; wall time "
              f"{time.time() - t0:.0f} s."), "",
             ("| setting | variant | students x epochs | s / student-epoch | speed-up vs reference | GFLOP/s | "
              "% fp32 peak | % bf16 peak | mean top-1 (%) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['setting']} | {r['variant']} | {r['students']} x {r['epochs']} | "
                     f"{r['per_student_epoch']:.4f} | {r['speedup']:.2f}x | {r['gflops']:.1f} | "
                     f"{100 * r['gflops'] / peak32:.1f} | {100 * r['gflops'] / peak16:.1f} | "
                     f"{100 * r['acc']:.2f} +- {100 * r['acc_std']:.2f} |")
    lines += ["", "FLOPs of one student's forward + backward per image: " + ", ".join(
        f"{r['setting']} {1000 * r['gflop_image']:.1f} MFLOP" for r in results if r["variant"] == "reference"), "",
        "Per-repeat seconds: " + "; ".join(f"{r['setting']} {r['variant']} {[round(v, 2) for v in r['all']]}"
                                          for r in results), ""]
    for name, tables in profiles.items():
        for kind, table in tables.items():
            lines += [f"## torch.profiler, {name}, {kind} (after a warm-up, self CPU time)", "", "```",
                      table, "```", ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
