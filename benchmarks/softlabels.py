"""Soft labels at scale: storage, relabel throughput and student accuracy of compact label formats.

A ConvNet-3 (BN, width 32) teacher is trained briefly on a CIFAR-10 subset (squeeze.train.run); the image set is
IPC 10 random real training images (the label format is what is compared, so the same images serve every format);
each format stores FKD-style labels for every student epoch (relabel.softlabels.generate) and fresh students are
trained on them (relabel.student.train_student, SRe2L protocol: AdamW + KL at the stored temperature) with the
same seeds, so differences are paired. Storage is projected to ImageNet-1K IPC 50 (50,000 images x 300 epochs).

    OMP_NUM_THREADS=2 python benchmarks/softlabels.py [--epochs 150 --students 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import publish
from distillset.core.data import Source
from distillset.core.runtime import get_runtime
from distillset.relabel.evaluate import random_subset
from distillset.relabel.softlabels import RelabelConfig, SoftLabels, generate, label_meta
from distillset.relabel.student import StudentSpec, train_student
from distillset.squeeze.checkpoint import load_teacher
from distillset.squeeze.train import SqueezeConfig
from distillset.squeeze.train import run as squeeze_run

DATA = "npz:/work/shared/data/cifar10.npz"
# (name, topk, quantize); topk 0 = the full distribution
FORMATS = [("full fp16", 0, "fp16"), ("top-5 fp16", 5, "fp16"), ("top-3 uint8", 3, "uint8"),
           ("top-2 uint8", 2, "uint8"), ("top-1 uint8", 1, "uint8")]


def bytes_per_crop(num_classes: int, topk: int, quantize: str) -> int:
    k = num_classes if topk == 0 else topk
    value = 1 if quantize == "uint8" else 2
    index = 0 if topk == 0 else (1 if num_classes <= 256 else 2)
    return k * (value + index) + (2 if quantize == "uint8" else 0)


def teacher(root: Path, epochs: int, max_train: int) -> str:
    out = root / "teacher_convnet3_bn"
    squeeze_run(SqueezeConfig(out=str(out), data=DATA, arch="convnet3_bn", model_kwargs={"width": 32},
                              epochs=epochs, max_train=max_train, batch_size=128, lr=0.05), get_runtime())
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/distillset_bench")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--max-train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--students", type=int, default=3)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "softlabels.md"))
    a = p.parse_args()
    t_start = time.time()
    root = Path(a.root)
    tpath = teacher(root, a.teacher_epochs, a.max_train)
    t = load_teacher(tpath)
    src = Source(DATA)
    train, test = src.load("train"), src.load("test")
    test = test.subset(torch.arange(min(a.test, len(test))))
    images = random_subset(train, 10, 0, 10)
    mean, std = t.config.mean, t.config.std
    rows = []
    for name, k, q in FORMATS:
        cfg = RelabelConfig(epochs=a.epochs, topk=k, quantize=q, batch_size=512, autocast="none")
        t0 = time.perf_counter()
        tensors = generate(images, [t], cfg, torch.device("cpu"), show_progress=False)
        secs = time.perf_counter() - t0
        soft = SoftLabels(tensors["values"], tensors.get("indices"), label_meta(cfg, [t], 10, len(images)),
                          tensors.get("scale"))
        accs = []
        for s in range(a.students):
            spec = StudentSpec("convnet3_bn", {"width": 32}, a.epochs, batch_size=50, autocast="none")
            accs.append(train_student(images, test, spec, mean, std, 1000 * s, torch.device("cpu"), soft=soft))
        rows.append({"name": name, "topk": k, "quantize": q, "bpi": soft.bytes_per_image() / a.epochs,
                     "relabel_ips": len(images) * a.epochs / secs, "accs": accs})
        print(rows[-1], flush=True)
    teacher_acc = t.config.metrics.get("test_top1")
    full = rows[0]
    in1k_full = bytes_per_crop(1000, 0, "fp16") * 50_000 * 300
    lines = [
        "# Soft labels at scale", "",
        (f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/softlabels.py --epochs {a.epochs} "
         f"--students {a.students} "
        f"--teacher-epochs {a.teacher_epochs} --max-train {a.max_train} --test {a.test}` "
        f"(wall time {time.time() - t_start:.0f} s on 2 CPU cores shared with other users)."), "",
        (f"Teacher: ConvNet-3 BN width 32, {a.teacher_epochs} epochs on {a.max_train} CIFAR-10 training images "
        f"(test top-1 {100 * teacher_acc:.1f}% on the full test split). Image set: IPC 10 random real training "
        f"images (100). Students: ConvNet-3 BN width 32, {a.epochs} epochs, SRe2L protocol (AdamW, KL at T=4), "
        f"{a.students} seeds (the same seeds for every format), top-1 on {len(test)} CIFAR-10 test images."), "",
        "| format | bytes/crop (CIFAR-10) | relabel img/s | student top-1 mean +- std | change vs full |",
        "|---|---|---|---|---|",
    ]
    base = statistics.fmean(full["accs"])
    for r in rows:
        mu = statistics.fmean(r["accs"])
        sd = statistics.stdev(r["accs"]) if len(r["accs"]) > 1 else 0.0
        lines.append(f"| {r['name']} | {r['bpi']:.0f} | {r['relabel_ips']:.0f} | {100 * mu:.2f} +- {100 * sd:.2f} | "
                     f"{100 * (mu - base):+.2f} |")
    lines += [
        "", ("Projected ImageNet-1K IPC 50 storage (50,000 images x 300 epochs, 1,000 classes; "
        "indices int16; crops are not stored: they are recomputed from the crop seed):"), "",
        "| format | bytes/crop | total | smaller than full fp16 |", "|---|---|---|---|",
    ]
    for name, k, q in [("full fp16 (SRe2L)", 0, "fp16"), ("top-10 fp16", 10, "fp16"), ("top-10 uint8", 10, "uint8"),
                       ("top-5 uint8", 5, "uint8")]:
        b = bytes_per_crop(1000, k, q)
        total = b * 50_000 * 300
        lines.append(f"| {name} | {b} | {total / 1e9:.2f} GB | {in1k_full / total:.0f}x |")
    lines.append("")
    publish(a.out, lines)


if __name__ == "__main__":
    main()
