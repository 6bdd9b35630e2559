"""Gradient leakage benchmark: DLG vs iDLG on MNIST and the CIFAR-10 subset, by batch size, plus the leakage of
gradients computed on a distilled set.

Every cell is one `distillset attack leak` run (``launch.leak.run``): ``trials`` rounds, each with a freshly
initialised sigmoid LeNet (weights uniform in [-0.5, 0.5], as DLG/iDLG) and ``B`` random training images; DLG and iDLG
see the same images and models (same seed). Reported per image (reconstructions paired with originals by least total
MSE): PSNR (mean and median: DLG either succeeds or fails), SSIM, label accuracy; beside them the PSNR of a uniform
random image and of the data's mean image, the final gradient distance and the seconds per trial. The distilled rows
capture iDLG gradients on a DM set of MNIST (IPC 1, from real or from noise) and add the PSNR of each reconstruction
to its nearest real training image, and of the synthetic image itself to its nearest real one.

    OMP_NUM_THREADS=1 python benchmarks/leak.py            # ~10-15 min on one shared CPU thread

Results: a table on stdout, ``benchmarks/results/leak.md``, the batch-size curve ``benchmarks/results/leak.png`` and
two grids of originals over reconstructions (``leak_grid_*.png``). Finished cells are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from distillset.core.runtime import get_runtime
from distillset.launch.leak import LeakConfig
from distillset.launch.leak import run as leak_run
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/distillset_leak")
    p.add_argument("--datasets", default="mnist,cifar10")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--trials", default="mnist=3,cifar10=2", help="trials per cell, per dataset")
    p.add_argument("--iterations", type=int, default=50, help="L-BFGS steps (DLG/iDLG: 300)")
    p.add_argument("--methods", default="idlg,dlg")
    p.add_argument("--distilled-trials", type=int, default=5, help="0: no distilled-set rows")
    p.add_argument("--label-images", type=int, default=1000, help="single-image gradients for the label-rule check")
    p.add_argument("--out", default=str(RESULTS / "leak.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    rt = get_runtime()
    root = Path(a.root)
    trials = {k: int(v) for k, v in (kv.split("=") for kv in a.trials.split(","))}
    t_all = time.time()
    labels = {ds: label_rule(f"npz:{SHARED / f'{ds}.npz'}", a.label_images) for ds in a.datasets.split(",")
              if a.label_images}
    rows = []
    for ds in a.datasets.split(","):
        data = f"npz:{SHARED / f'{ds}.npz'}"
        for b in (int(x) for x in a.batch_sizes.split(",")):
            for method in a.methods.split(","):
                cell = root / ds / (f"{method}_b{b}" + (f"_it{a.iterations}" if a.iterations != 50 else ""))
                res = leak_run(LeakConfig(out=str(cell), data=data, method=method,
                                          batch_size=b, trials=trials.get(ds, 2), iterations=a.iterations), rt)
                rows.append((ds, b, method, res))
                m = res["means"]
                print(f"{ds} B={b} {method}: psnr {m['psnr']:.1f} (median {m['psnr_median']:.1f}) label acc "
                      f"{m['label_accuracy']:.2f} [{time.time() - t_all:.0f} s]", flush=True)
    distilled = []
    mnist = f"npz:{SHARED / 'mnist.npz'}"
    for init in ("real", "noise") if a.distilled_trials else ():
        folder = root / f"dm_mnist_ipc1_{init}"
        recover_run(RecoverConfig(out=str(folder), data=mnist, method="dm", ipc=1, iterations=200,
                                  param_options={"init": init}, augmentation="none", optimizer="sgd", lr=1.0,
                                  momentum=0.5, schedule="constant", classes_per_unit=10,
                                  options={"batch_real": 64, "aug": "dsa", "width": 64}), rt)
        res = leak_run(LeakConfig(out=str(root / f"leak_dm_{init}"), distilled=str(folder), data=mnist,
                                  method="idlg", batch_size=1, trials=a.distilled_trials,
                                  iterations=a.iterations), rt)
        distilled.append((init, res))
        print(f"DM ({init} init) iDLG: psnr {res['means']['psnr']:.1f}", flush=True)
    total = time.time() - t_all
    write(a.out, rows, distilled, labels, a, total)
    out = Path(a.out)
    plot(out.with_suffix(".png"), rows)
    for ds, b, method, _ in rows:  # two grids worth looking at, beside the table
        if (ds, b, method) in (("mnist", 4, "idlg"), ("cifar10", 1, "idlg")):
            cell = root / ds / (f"{method}_b{b}" + (f"_it{a.iterations}" if a.iterations != 50 else ""))
            shutil.copyfile(cell / "grid.png", out.parent / f"{out.stem}_grid_{ds}_b{b}.png")


def label_rule(data: str, n: int, per_model: int = 20) -> tuple[int, int]:
    """iDLG's label rule alone on ``n`` single-image gradients of random training images (a fresh sigmoid LeNet
    every ``per_model`` images): (correct, n)."""
    from distillset.core.data import Source
    from distillset.recover.objectives.leak import capture_gradient, idlg_labels
    from distillset.squeeze.checkpoint import BackboneConfig, Teacher
    from distillset.squeeze.models import create_model

    train = Source(data).load("train")
    c, h, _ = train.image_shape
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    correct = 0
    for k, i in enumerate(idx.tolist()):
        if k % per_model == 0:
            torch.manual_seed(k)
            model = create_model("lenet_sigmoid", train.num_classes, c, h)
            teacher = Teacher(model, BackboneConfig("lenet_sigmoid", train.num_classes, c, h, [0.0] * c, [1.0] * c))
            teacher.eval().requires_grad_(False)
        g = capture_gradient(teacher, train.images[i:i + 1].float() / 255, train.labels[i:i + 1])
        correct += int(idlg_labels(g["classifier.weight"], g["classifier.bias"], 1)[0] == train.labels[i])
    return correct, n


def write(path: str, rows, distilled, labels, a, total: float) -> None:
    lines = []
    if labels:
        lines += ["iDLG's label rule alone (single-image gradients of random training images, a fresh LeNet every "
                  "20): " + ", ".join(f"{ds} {c}/{n}" for ds, (c, n) in labels.items()) + ".", ""]
    lines += ["| data | B | method | images | label acc (set) | PSNR mean | PSNR median | SSIM | PSNR random | PSNR "
              "mean image | grad dist | s / trial |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ds, b, method, res in rows:
        m = res["means"]
        n = res["trials"] * b
        lines.append(f"| {ds} | {b} | {method} | {n} | {m['label_accuracy']:.2f} ({m['label_set_accuracy']:.2f}) | "
                     f"{fmt(m['psnr'])} | {fmt(m['psnr_median'])} | {fmt(m['ssim'], 3)} | {fmt(m['psnr_random'])} | "
                     f"{fmt(m['psnr_mean'])} | {m['grad_distance']:.2g} | {m['seconds_per_trial']:.1f} |")
    if distilled:
        lines += ["", "Gradients of a distilled set (DM, MNIST, IPC 1, 200 steps; iDLG, B = 1): the reconstruction vs "
                  "the synthetic image it came from, vs its nearest real training image, and the synthetic image vs "
                  "its nearest real one.", "",
                  "| DM init | images | label acc | PSNR to synthetic | SSIM | PSNR to nearest real | synthetic's PSNR "
                  "to nearest real |", "|---|---|---|---|---|---|---|"]
        for init, res in distilled:
            m = res["means"]
            lines.append(f"| {init} | {res['trials']} | {m['label_accuracy']:.2f} | {fmt(m['psnr'])} | "
                         f"{fmt(m['ssim'], 3)} | {fmt(m.get('psnr_nearest_real'))} | "
                         f"{fmt(m.get('original_psnr_nearest_real'))} |")
    attack = sum(r["trials"] * r["means"]["seconds_per_trial"] for *_, r in rows + distilled)
    lines += ["", f"{a.iterations} L-BFGS steps (strong-Wolfe line search) per attack, fresh sigmoid LeNet per trial; "
              f"attacks {attack / 60:.1f} min in all on one thread (this invocation {total / 60:.1f} min; cells "
              "finished earlier are read back).", ""]
    text = "\n".join(lines)
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# Gradient leakage (benchmarks/leak.py)\n\n" + text)


def plot(path: Path, rows) -> None:
    """PSNR (mean and median) against the batch size, one panel per dataset, the two guesses dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for method, color in (("idlg", "C0"), ("dlg", "C1")):
            sel = [(b, r["means"]) for d, b, m, r in rows if d == ds and m == method]
            bs = [b for b, _ in sel]
            ax.plot(bs, [m["psnr"] for _, m in sel], "o-", color=color, label=f"{method} mean")
            ax.plot(bs, [m["psnr_median"] for _, m in sel], "s:", color=color, label=f"{method} median")
        sel = [(b, r["means"]) for d, b, m, r in rows if d == ds and m == "idlg"]
        ax.plot([b for b, _ in sel], [m["psnr_mean"] for _, m in sel], "--", color="gray", label="mean image")
        ax.plot([b for b, _ in sel], [m["psnr_random"] for _, m in sel], "--", color="silver", label="uniform noise")
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch size")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
