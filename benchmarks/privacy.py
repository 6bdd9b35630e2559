"""Membership inference and visual privacy of distilled sets on real data ("Privacy for Free", ICML'22).

Runs a privacy recipe (``recipes/privacy_mnist.yaml`` or ``recipes/privacy_cifar10.yaml``) on the local copy of its
data, then ``privacy nearest`` over the first seed's distilled sets, and writes one table:

    OMP_NUM_THREADS=2 python benchmarks/privacy.py --recipe recipes/privacy_mnist.yaml \\
        --data npz:../shared/data/mnist.npz [--set privacy_mia.seeds=2 ...]

Results: the table on stdout and ``benchmarks/results/privacy_<recipe>.md`` (plus the run folders under --root).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from distillset.launch.privacy import run_mia, run_nearest
from distillset.launch.recipe import plan_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "privacy_mnist.yaml"))
    p.add_argument("--data", required=True, help="e.g. npz:../shared/data/mnist.npz")
    p.add_argument("--root", default="/tmp/distillset_privacy")
    p.add_argument("--set", action="append", default=[], help="recipe override, e.g. privacy_mia.seeds=2")
    p.add_argument("--matching-seeds", type=int, default=0,
                   help="seeds of the DC/DSA targets (bi-level, ~10x DM's cost), if fewer than the recipe's")
    args = p.parse_args()
    name = Path(args.recipe).stem
    out_root = str(Path(args.root) / name)
    _, plan = plan_recipe(args.recipe, None, out_root, [f"squeeze.data={args.data}", *args.set])
    cfgs = dict(plan)
    from distillset.squeeze.train import run as squeeze

    squeeze(cfgs["squeeze"])  # the feature extractor of privacy nearest (resumes: a finished one is kept)
    t0 = time.perf_counter()
    cfg = cfgs["privacy_mia"]
    matching = {k: v for k, v in cfg.targets.items() if (v or {}).get("method") in ("dc", "dsa")}
    if args.matching_seeds and matching:  # two runs into one folder: records are per (target, seed)
        rest = {k: v for k, v in cfg.targets.items() if k not in matching}
        mia = run_mia(dataclasses.replace(cfg, targets=rest))
        more = run_mia(dataclasses.replace(cfg, targets=matching, seeds=args.matching_seeds))
        mia["summary"] += more["summary"]
        mia["runs"] += more["runs"]
    else:
        mia = run_mia(cfg)
    t_mia = time.perf_counter() - t0
    near = run_nearest(cfgs["privacy_nearest"])
    n_seeds = {s["target"]: s["n"] for s in mia["summary"]}
    seeds = f"{cfg.seeds} seeds" + (f" ({args.matching_seeds} for DC/DSA)" if args.matching_seeds else "")
    command = (f"OMP_NUM_THREADS=2 python benchmarks/privacy.py --recipe {Path(args.recipe).relative_to(ROOT)} "
               f"--data {args.data}" + (f" --matching-seeds {args.matching_seeds}" if args.matching_seeds else "")
               + "".join(f" --set {s}" for s in args.set))
    null = mia["runs"][0]["loss_attack"]["null_advantage"]
    lines = [
        f"# Privacy of distilled sets: {name}", "",
        (f"Data `{args.data}`, {mia['members_per_class']} members and as many non-members per class, IPC "
         f"{mia['ipc']}, {seeds}; machine: {platform.machine()}, {torch.get_num_threads()} threads; "
         f"{t_mia / 60:.1f} min. Command: `{command}`."), "",
        ("Loss-threshold attack. Advantage = max over thresholds of TPR - FPR (= 2 x (balanced accuracy - 50%)); "
         "the threshold is chosen on the scores themselves, so a model that leaks nothing still scores about "
         f"{100 * null:.1f} points (the two-sample KS statistic); the held-out advantage chooses the threshold on "
         "one half and scores the other (0 for no leak)."), "",
        ("| target | seeds | train images | test top-1 | advantage (best tau) | advantage (held-out tau) | AUC | "
         "TPR @ 1% FPR |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in mia["summary"]:
        runs = [r["loss_attack"]["advantage_heldout"] for r in mia["runs"] if r["target"] == s["target"]]
        held = sum(runs) / len(runs)
        held_sd = (sum((v - held) ** 2 for v in runs) / max(1, len(runs) - 1)) ** 0.5
        lines.append(f"| {s['target']} | {n_seeds[s['target']]} | {s['train_images']} | "
                     f"{100 * s['test_top1']:.2f} +- {100 * s['test_top1_std']:.2f} | {100 * s['advantage']:+.2f} +- {100 * s['advantage_std']:.2f} "
                     f"| {100 * held:+.2f} +- {100 * held_sd:.2f} | {s['auc']:.3f} +- {s['auc_std']:.3f} | "
                     f"{100 * s['tpr_at_1pct_fpr']:.2f} |")
    if any("lira_auc" in s for s in mia["summary"]):
        lines += ["", "| target | LiRA advantage | LiRA AUC | LiRA TPR @ 1% FPR |", "| --- | ---: | ---: | ---: |"]
        for s in mia["summary"]:
            if "lira_auc" in s:
                lines.append(f"| {s['target']} | {100 * s['lira_advantage']:+.2f} | {s['lira_auc']:.3f} | "
                             f"{100 * s['lira_tpr_at_1pct_fpr']:.2f} |")
    lines += ["", ("Visual privacy (first seed): nearest training image of each synthetic image, beside held-out real "
                   "test images (the reference: how close an image that was never trained on comes)."), "",
              ("| set | init | nearest L2 (synthetic) | nearest L2 (held-out real) | max SSIM, own class (synthetic) "
               "| max SSIM (held-out real) | nearest feature cos-dist (synthetic / held-out) | closer than 5% of "
               "held-out |"),
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for set_name, s in near["sets"].items():
        lines.append(f"| {set_name} | {s['init']} | {s['synthetic']['l2_nearest_mean']:.4f} | "
                     f"{s['reference']['l2_nearest_mean']:.4f} | {s['synthetic']['ssim_nearest_mean']:.3f} | "
                     f"{s['reference']['ssim_nearest_mean']:.3f} | "
                     f"{s['synthetic'].get('feature_nearest_mean', float('nan')):.3f} / "
                     f"{s['reference'].get('feature_nearest_mean', float('nan')):.3f} | "
                     f"{100 * s['synthetic']['share_closer_than_reference_5pct']:.0f}% |")
    table = "\n".join(lines) + "\n"
    print(table)
    res = ROOT / "benchmarks" / "results" / f"{name}.md"
    res.write_text(table)
    (Path(out_root) / "benchmark.json").write_text(json.dumps({"mia": mia["summary"], "nearest": near}, indent=1,
                                                                default=str))


if __name__ == "__main__":
    main()
