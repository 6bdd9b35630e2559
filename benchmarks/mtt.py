"""MTT-family benchmark on the CIFAR-10 subset under a small CPU budget.

Stages (each resumable, so a re-run continues): record experts (``squeeze trajectories``), distil with ``recover``
(method mtt / tesla / datm), evaluate by training fresh ConvNet-3 students on the distilled images (the lead's
``relabel.student.train_student``, matching protocol: SGD momentum 0.9, wd 5e-4, lr = the learned lr, x0.1 at half,
DSA) beside random real images of the same size under the same protocol. Writes ``benchmarks/results/mtt.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mtt.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mtt.py --zca   # MTT's CIFAR setting: experts, synthetic images,
                                                                # students and test images ZCA-whitened
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillset.core.data import ImageSet, Source
from distillset.core.distilled import load_distilled
from distillset.core.runtime import get_runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run
from distillset.relabel.evaluate import learned_params, random_subset
from distillset.relabel.student import StudentSpec, train_student
from distillset.squeeze.inputs import ZCA, ZCA_FILE
from distillset.squeeze.train import channel_stats
from distillset.squeeze.trajectories import TrajectoryConfig
from distillset.squeeze.trajectories import run as record

DATA = "npz:/work/shared/data/cifar10.npz"


def options(method: str, ipc: int, a) -> dict:
    o = {"buffer": str(a.work / a.experts_dir), "expert_epochs": 2, "syn_steps": a.syn_steps,
         "max_start_epoch": a.expert_epochs - 2, "batch_syn": min(a.batch_syn, 10 * ipc), "lr_teacher": 0.01,
         "lr_lr": 1e-7 if ipc == 1 else 1e-5}
    if method == "tesla":
        o["tesla"] = True
    if method == "datm":
        o.update(current_max_start_epoch=max(1, (a.expert_epochs - 2) // 2), lr_y=2.0, expansion_end=0.5)
    return o


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/distillset_bench/mtt"))
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--expert-epochs", type=int, default=6)
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--iterations", default="80,30")
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--lr-img", type=float, default=250.0)
    p.add_argument("--methods", default="mtt")
    p.add_argument("--students", type=int, default=3)
    p.add_argument("--student-epochs", type=int, default=100)
    p.add_argument("--test-n", type=int, default=2000)
    p.add_argument("--zca", action="store_true", help="ZCA-whiten (experts record it; recover and students use it)")
    p.add_argument("--result", type=Path, default=None, help="default results/mtt.md (mtt_zca.md with --zca)")
    a = p.parse_args()
    a.experts_dir = "experts_zca" if a.zca else "experts"
    a.result = a.result or Path(__file__).parent / "results" / ("mtt_zca.md" if a.zca else "mtt.md")
    tag = " + ZCA" if a.zca else ""
    rt = get_runtime()
    t_all = time.perf_counter()
    kw = {"width": a.width}
    t0 = time.perf_counter()
    ex = record(TrajectoryConfig(out=str(a.work / a.experts_dir), data=DATA, arch="convnet3", model_kwargs=kw,
                                 num_experts=a.experts, epochs=a.expert_epochs, max_train=a.max_train,
                                 augment="dsa", eval_test=True, zca=a.zca), rt)
    zca = ZCA.load(a.work / a.experts_dir / ZCA_FILE) if a.zca else None
    t_experts = time.perf_counter() - t0
    src = Source(DATA)
    train = src.load("train")
    train = train.subset(torch.arange(min(a.max_train, len(train))))
    test = src.load("test")
    # the test split is sorted by class: a seeded random subset keeps it balanced
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:a.test_n])
    mean, std = channel_stats(train.images)
    rows = []
    for ipc, iters in zip(map(int, a.ipcs.split(",")), map(int, a.iterations.split(","))):
        spec = StudentSpec(arch="convnet3", model_kwargs=kw, epochs=a.student_epochs, protocol="matching",
                           batch_size=256, lr=0.01, autocast="none")
        accs = [train_student(random_subset(train, ipc, s, 10), test, spec, mean, std, s, rt.device, zca=zca)
                for s in range(a.students)]
        rows.append({"method": "random real" + tag, "ipc": ipc, "iters": 0, "accs": accs, "distil_s": 0.0, "lr": 0.01})
        for method in a.methods.split(","):
            out = a.work / f"{method}_ipc{ipc}{'_zca' if a.zca else ''}_lr{a.lr_img:g}"
            t0 = time.perf_counter()
            cfg = RecoverConfig(out=str(out), data=DATA, method="datm" if method == "datm" else "mtt",
                                options=options(method, ipc, a), param_options={"init": "real"},
                                augmentation="dsa", ipc=ipc, iterations=iters, lr=a.lr_img, optimizer="sgd",
                                momentum=0.5, schedule="constant", classes_per_unit=0, log_every=10,
                                checkpoint_every=10, channels_last=False, autocast="none")
            manifest = recover_run(cfg, rt)
            t_distil = time.perf_counter() - t0
            images, man = load_distilled(out)
            assert bool(man.get("zca")) == a.zca  # the run took the experts' whitening (recorded for evaluation)
            learned = learned_params(out)
            lr = float(learned["lr"].reshape(-1)[0])
            soft = torch.softmax(learned["soft_labels"].float(), 1) if "soft_labels" in learned else None
            spec_d = StudentSpec(arch="convnet3", model_kwargs=kw, epochs=a.student_epochs, protocol="matching",
                                 batch_size=256, lr=lr, autocast="none")
            syn = ImageSet(images.images, images.labels, images.class_names[:10])
            accs = [train_student(syn, test, spec_d, mean, std, s, rt.device, soft_targets=soft, zca=zca)
                    for s in range(a.students)]
            stats = manifest["runs"][-1]["ranks"][0]["units"]
            rows.append({"method": method + tag, "ipc": ipc, "iters": iters, "accs": accs, "distil_s": t_distil,
                         "lr": lr, "loss": stats[0].get("match") if stats else None})
            print(json.dumps(rows[-1]), flush=True)
    total = time.perf_counter() - t_all
    lines = ["# MTT family on the CIFAR-10 subset (CPU budget)", "",
             (f"Experts: {a.experts} x ConvNet-3 (width {a.width}, instance norm) x {a.expert_epochs} epochs, SGD lr "
             f"0.01, no momentum, DSA, on the first {a.max_train} CIFAR-10 training images"
             + (", inputs ZCA-whitened (reg 0.1, fitted on those images) " if a.zca else " ") +
             f"(expert test top-1 {ex.get('test_top1_mean') or 0:.3f}; "
             + (f"{t_experts:.0f} s)." if ex["trained"] else "recorded by an earlier invocation, reused).")),
             (f"Distillation: expert_epochs 2, syn_steps {a.syn_steps}, batch_syn <= {a.batch_syn}, max_start_epoch "
             f"{a.expert_epochs - 2}, "
             f"pixel lr {a.lr_img} (SGD momentum 0.5), init from real, DSA."),
             (f"Evaluation: {a.students} fresh ConvNet-3 (width {a.width}) students, {a.student_epochs} epochs, SGD "
             "momentum 0.9, wd 5e-4, lr = learned lr (0.01 for random real), x0.1 at half, DSA; top-1 on "
             f"{a.test_n} random test images, mean +- std."), "",
             "| method | IPC | iterations | distil s | learned lr | top-1 (%) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = torch.tensor(r["accs"]) * 100
        lines.append(f"| {r['method']} | {r['ipc']} | {r['iters']} | {r['distil_s']:.0f} | {r['lr']:.4g} | "
                     f"{t.mean():.1f} +- {t.std() if len(t) > 1 else 0:.1f} |")
    load = os.getloadavg()[1]
    lines += ["", f"Total wall time {total:.0f} s on a 2-core CPU (load average {load:.1f} at the end).", "",
              "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mtt.py " + " ".join(sys.argv[1:]) + "`", "",
              ("This is a CPU-budget run (tiny experts, tens of iterations instead of 5,000), far from the published "
              "setting (100 experts x 50 epochs, ZCA, 5,000 iterations, ConvNet-3 width 128: MTT 46.2 / 65.4 at "
              "IPC 1 / 10); compare each method only with the random-real row of the same IPC.")]
    a.result.parent.mkdir(parents=True, exist_ok=True)
    a.result.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
