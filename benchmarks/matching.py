"""Benchmark: coreset baselines and matching methods on the CIFAR-10 subset, evaluated by fresh ConvNet-3 students.

For each method and IPC: distil with ``recover.engine.run`` (in a spawned child process, so its peak RSS is its own),
then train ``--students`` fresh ConvNet-3 students on the result with the matching protocol of
``relabel.student.train_student`` (SGD momentum 0.9, wd 5e-4, lr 0.01, x0.1 at half, DSA on) and report top-1 on
the real test split as mean +- std, with distillation wall time and peak memory. The table is rewritten after every
setting (``benchmarks/results/matching.md``), so a run cut short keeps what it finished.

The defaults are a CPU budget (a 2-core machine shared with other jobs): narrow networks, few iterations, few student
epochs and a stratified test subset. Every deviation from the papers is a flag and is printed in the output file.

    python benchmarks/matching.py                         # CPU budget (~25 min on 2 shared cores)
    python benchmarks/matching.py --width 128 --student-width 128 --test-size 0 --epochs 300 \
        --iters dm=20000,dc=1000,dsa=1000 --batch-real 256  # the papers' scale (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from distillset.core.data import ImageSet, Source
from distillset.core.distilled import load_distilled
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run

DATA = "npz:/work/shared/data/cifar10.npz"


def recover_config(name: str, ipc: int, out: str, args) -> RecoverConfig:
    """``NAME@LR``: the method's settings with image learning rate LR."""
    cfg = _paper_config(name.partition("@")[0], ipc, out, args)
    lr = name.partition("@")[2]
    return dataclasses.replace(cfg, lr=float(lr)) if lr else cfg


def _paper_config(name: str, ipc: int, out: str, args) -> RecoverConfig:
    """The method's paper settings, scaled to the budget by the command-line flags. ``NAME_zca``: the same method
    with ZCA whitening fitted on the training images (stored with the set; evaluation applies it)."""
    method = name.removesuffix("_zca")
    net = {"width": args.width, "batch_real": args.batch_real}
    common = {"out": out, "data": args.data, "method": method, "ipc": ipc, "parametrization": "pixel",
              "param_options": {"init": "real"}, "augmentation": "none", "autocast": "none", "log_every": 10,
              "seed": args.seed, "zca": "fit" if name.endswith("_zca") else ""}
    iters = args.iters.get(method, 0)
    if method in ("random", "herding", "kcenter"):
        opts = {"features": "random_convnet"} if method != "random" else {}
        return RecoverConfig(**common, iterations=0, options=opts, classes_per_unit=10)
    if method == "dm":
        return RecoverConfig(**common, iterations=iters, optimizer="sgd", lr=1.0, momentum=0.5, schedule="constant",
                             classes_per_unit=10, options=net)
    if method in ("dc", "dsa", "cafe"):
        outer, inner = (1, 1) if ipc == 1 else (10, args.inner_ipc10)
        opts = {**net, "outer_loop": outer, "inner_loop": inner}
        return RecoverConfig(**common, iterations=iters * outer, optimizer="sgd", lr=0.1, momentum=0.5,
                             schedule="constant", classes_per_unit=0, options=opts)
    if method == "datadam":
        return RecoverConfig(**common, iterations=iters, optimizer="sgd", lr=1.0, momentum=0.5, schedule="constant",
                             classes_per_unit=10, options=net)
    raise SystemExit(f"unknown method {method}")


def _distil_child(cfg: RecoverConfig, threads: int, q) -> None:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    recover_run(cfg)
    q.put({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). getrusage's ru_maxrss survives exec, so a spawned child would
    report at least its parent's peak; VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distil(cfg: RecoverConfig, threads: int) -> dict:
    ctx = mp.get_context("spawn")  # fork after torch started its thread pool can deadlock
    q = ctx.Queue()
    p = ctx.Process(target=_distil_child, args=(cfg, threads, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"distillation of {cfg.method} failed (exit {p.exitcode})")
    return q.get()


def stratified(test: ImageSet, per_class: int) -> ImageSet:
    if per_class <= 0:
        return test
    g = torch.Generator().manual_seed(0)
    idx = [torch.nonzero(test.labels == c).flatten() for c in range(test.num_classes)]
    idx = [i[torch.randperm(len(i), generator=g)[:per_class]] for i in idx]
    return test.subset(torch.cat(idx))


def evaluate(images: ImageSet, test: ImageSet, ipc: int, args, manifest: dict, folder: str) -> list[float]:
    """Fresh students in the set's own input space (its mean/std and ZCA whitening), as `distillset evaluate`."""
    from distillset.relabel.student import StudentSpec, train_student
    from distillset.squeeze.inputs import ZCA

    spec = StudentSpec(arch="convnet3", model_kwargs={"width": args.student_width},
                       epochs=args.epochs_ipc1 if ipc == 1 else args.epochs, protocol="matching",
                       batch_size=256, autocast="none")
    zca = ZCA.load(Path(folder) / manifest["zca"]) if manifest.get("zca") else None
    return [100 * train_student(images, test, spec, manifest["mean"], manifest["std"], seed=1000 + k, device="cpu",
                                zca=zca)
            for k in range(args.students)]


def write_table(rows: list[dict], args, path: Path, total: float) -> str:
    lines = [
        "# Matching methods and coresets on CIFAR-10 (benchmarks/matching.py)",
        "",
        f"Data: `{args.data}` (1000 train images per class, JPEG-decoded CIFAR-10; see shared/data/README.md).",
        f"Students: {args.students} x ConvNet-3 (instance norm, width {args.student_width}) per setting, inputs "
        "normalised as the set records (and ZCA-whitened for the `_zca` rows, whose whitening is fitted on the "
        "training images), SGD "
        f"momentum 0.9, wd 5e-4, lr 0.01 x0.1 at half, DSA on, batch 256, {args.epochs_ipc1} epochs (IPC 1) / "
        f"{args.epochs} epochs (IPC 10); top-1 on "
        + ("the full 10,000-image test set." if args.test_size == 0 else
           f"a fixed stratified {10 * args.test_size}-image subset of the test set ({args.test_size} per class)."),
        (f"Distillation: ConvNet-3 width {args.width}, batch_real {args.batch_real}, init from real, seed {args.seed}; "
        f"iterations (outer iterations for DC/DSA) {args.iters}; DC/DSA loops (1,1) at IPC 1 and "
        f"(10,{args.inner_ipc10}) at IPC 10; {args.threads} torch thread(s)."),
        ("Time = distillation wall time; memory = peak RSS of the distillation process (includes torch and the "
        "loaded data, ~0.5 GB)."),
        ("CPU budget: these are far smaller runs than the papers' (DM 20k iterations, DC/DSA 1000 outer iterations, "
        "width 128, 300-1000 student epochs); numbers show relative behaviour at this budget, not published accuracy."),
        "",
        "| method | IPC | top-1 % (mean +- std) | students | distil time s | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = r["acc"]
        m, s = statistics.fmean(acc), (statistics.stdev(acc) if len(acc) > 1 else 0.0)
        rss = f"<= {r['peak_rss_mb']:.0f}" if r.get("rss_upper_bound") else f"{r['peak_rss_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['ipc']} | {m:.2f} +- {s:.2f} | {len(acc)} | {r['seconds']:.1f} | {rss} |")
    lines += ["", f"Total benchmark wall time: {total / 60:.1f} min.", "",
              "Commands: " + "; ".join(f"`{c}`" for c in args.commands), ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (path.with_suffix(".json")).write_text(json.dumps({"rows": rows, "total_seconds": total, "commands": args.commands}, indent=1))
    return text


def parse_iters(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--methods", default="random,herding,kcenter,dm,dc,dsa")
    ap.add_argument("--ipcs", default="1,10")
    ap.add_argument("--iters", type=parse_iters, default=parse_iters("dm=60,dc=15,dsa=15,cafe=15,datadam=60"),
                    help="iterations per method (DC/DSA/CAFE: outer iterations, x outer_loop engine steps)")
    ap.add_argument("--inner-ipc10", type=int, default=5, help="DC/DSA inner loop at IPC 10 (paper: 50)")
    ap.add_argument("--width", type=int, default=32, help="distillation ConvNet width (paper: 128)")
    ap.add_argument("--batch-real", type=int, default=64, help="real images per class per step (paper: 256)")
    ap.add_argument("--student-width", type=int, default=32, help="student ConvNet-3 width (paper: 128)")
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40, help="student epochs at IPC 10 (paper: 300-1000)")
    ap.add_argument("--epochs-ipc1", type=int, default=100, help="student epochs at IPC 1")
    ap.add_argument("--test-size", type=int, default=200, help="test images per class (0 = the full test set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/matching.md"))
    ap.add_argument("--append", action="store_true", help="add to the rows of an earlier run (same settings)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.commands = [" ".join(["python", "benchmarks/matching.py"] + sys.argv[1:])]
    if args.append and Path(args.out).with_suffix(".json").exists():
        args.commands = json.loads(Path(args.out).with_suffix(".json").read_text()).get("commands", []) + args.commands
    test = stratified(Source(args.data).load("test"), args.test_size)
    rows: list[dict] = []
    prev_seconds = 0.0
    if args.append and Path(args.out).with_suffix(".json").exists():
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        rows, prev_seconds = saved["rows"], saved.get("total_seconds", 0.0)
    t0 = time.perf_counter() - prev_seconds
    with tempfile.TemporaryDirectory() as tmp:
        for ipc in [int(i) for i in args.ipcs.split(",")]:
            for method in args.methods.split(","):
                cfg = recover_config(method, ipc, f"{tmp}/{method}_{ipc}", args)
                stats = distil(cfg, args.threads)
                images, manifest = load_distilled(cfg.out)
                acc = evaluate(images, test, ipc, args, manifest, cfg.out)
                rows.append({"method": method, "ipc": ipc, "acc": acc, **stats})
                text = write_table(rows, args, Path(args.out), time.perf_counter() - t0)
                print(f"{method} ipc {ipc}: {statistics.fmean(acc):.2f} ({stats['seconds']:.0f}s distil, "
                      f"{time.perf_counter() - t0:.0f}s total)", flush=True)
    print(text)


if __name__ == "__main__":
    main()
