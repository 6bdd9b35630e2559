"""Vision-language distillation on Flickr8k-64 (2,000 train / 1,000 test images, 5 captions each), at 32 px.

Protocol (Wu et al.'s, at CPU size): a small CLIP-style model (ConvNet image tower, 2-layer text transformer, BPE
vocabulary trained on the training captions) is trained once on the 2,000 real train pairs and frozen; expert
trajectories of its two projection heads are recorded on the cached real features; N pairs (pixels + text
embeddings) are distilled by bi-trajectory matching from random real pairs; every set is evaluated by training fresh
heads (same recipe, several seeds) and measuring recall@1/5/10 both ways on the 1,000 test images x 5 captions,
beside random real pairs of the same count, herding and k-center in the joint embedding, and the full data.

    OMP_NUM_THREADS=1 python benchmarks/vl.py            # ~25 min on a shared 2-core CPU

Results: a table on stdout and ``benchmarks/results/vl_flickr8k.md``. Every stage skips finished work, so a rerun
with the same --root only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distillset.launch.vl import VLDistillConfig, VLEvaluateConfig, VLTrainConfig, run_distill, run_evaluate, run_train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"npz:{SHARED / 'flickr8k_64.npz'}")
    p.add_argument("--root", default="/tmp/distillset_vl")
    p.add_argument("--pairs", type=int, nargs="+", default=[100, 500])
    p.add_argument("--distill-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--clip-epochs", type=int, default=20)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--options", default='{"syn_steps": 20, "batch_syn": 50, "expert_epochs": 2, "max_start_epoch": 10}')
    p.add_argument("--lr-image", type=float, default=0.01)
    p.add_argument("--lr-text", type=float, default=0.01)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vl_flickr8k.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    root = Path(a.root)
    t0 = time.perf_counter()
    trained = run_train(VLTrainConfig(out=str(root / "model"), data=a.data, model_kwargs={"width": a.width},
                                      clip_epochs=a.clip_epochs, context_length=24))
    t_train = time.perf_counter() - t0
    folders, walls = {}, {}
    for n in a.pairs:
        for s in a.distill_seeds:
            out = root / f"distilled_{n}_s{s}"
            t = time.perf_counter()
            run_distill(VLDistillConfig(out=str(out), model=str(root / "model"), pairs=n, iterations=a.iterations,
                                        lr_image=a.lr_image, lr_text=a.lr_text, options=json.loads(a.options),
                                        seed=s))
            walls[out.name] = time.perf_counter() - t
            folders.setdefault(n, []).append(out)
    t = time.perf_counter()
    res = run_evaluate(VLEvaluateConfig(out=str(root / "eval"), model=str(root / "model"),
                                        distilled=[str(f) for fs in folders.values() for f in fs],
                                        seeds=a.eval_seeds))
    t_eval = time.perf_counter() - t
    lines = ["| set | pairs | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mean recall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name: str, n: int, runs: list[dict]) -> None:
        cells = [f"{statistics.fmean(r[m] for r in runs):.1f}" for m in METRICS[:-1]]
        means = [r["mean_recall"] for r in runs]
        sd = statistics.pstdev(means) if len(means) > 1 else 0.0
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {statistics.fmean(means):.2f} +- {sd:.2f} |")

    pre = trained["pretrained_heads_test"]
    lines.append("| pretrained heads (the frozen model's own) | 2000 | " +
                 " | ".join(f"{pre[m]:.1f}" for m in METRICS[:-1]) + f" | {pre['mean_recall']:.2f} |")
    row("full data (fresh heads)", 2000, res["full"]["per_seed"])
    for n in a.pairs:
        for kind in ("random", "herding", "kcenter"):
            row(f"{kind} real pairs", n, res[f"{kind}:{n}"]["per_seed"])
        runs = [r for f in folders[n] for r in res[f"distilled:{f.name}"]["per_seed"]]
        row(f"distilled (bimtt, {len(folders[n])} sets)", n, runs)
    table = "\n".join(lines)
    match = {f: json.loads((f / "manifest.json").read_text())["metrics"] for fs in folders.values() for f in fs}
    notes = (f"\nmean +- std over {len(a.eval_seeds)} head-training seeds (x {len(a.distill_seeds)} distilled sets for "
             f"bimtt; random pairs are redrawn per seed). Matching loss first -> last step: " +
             ", ".join(f"{f.name} {m['first_match']:.2f} -> {m['last_match']:.2f} (lr {m['syn_lr']:.3f})"
                       for f, m in match.items()) +
             f".\nWall: train (tokenizer + CLIP + experts) {t_train:.0f}s, distil " +
             ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()) + f", evaluate {t_eval:.0f}s; "
             f"total {time.perf_counter() - t0:.0f}s, 1 thread on a shared 2-core CPU.\n")
    print(table + notes)
    header = (f"# Vision-language distillation, Flickr8k-64 at 32 px\n\n`OMP_NUM_THREADS=1 python benchmarks/vl.py "
              f"--pairs {' '.join(map(str, a.pairs))} --iterations {a.iterations}`; options {a.options}, "
              f"lr_image {a.lr_image}, lr_text {a.lr_text}, CLIP {a.clip_epochs} epochs, ConvNet width {a.width}.\n\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(header + table + "\n" + notes)


if __name__ == "__main__":
    main()
