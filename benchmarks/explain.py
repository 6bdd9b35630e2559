"""Distilled images as IG baselines, measured: CIFAR-10 subset (vehicles / animals) and Tiny-ImageNet-10 (WordNet
hypernyms: animal / artifact / natural object), on a CPU budget.

Per dataset: a fine classifier (ConvNet-BN) is trained by squeeze; recover distils the data by its coarse groups
(DM, IPC 1 from real images; IPC 10 for the nearest pick; RDED, IPC 1, one teacher-scored real crop per group,
from a coarse classifier trained on the grouped source) and picks random real images of each group (the ``random``
coreset, IPC 1: DM's starting images) as a control; ``explain`` compares black, mean, blur, uniform and the distilled baseline
on the same images and model (several seeds), then the two other coarse sets as the distilled baseline on the same
images. The grouping is the shipped recipes' (recipes/explain_*.yaml).

    OMP_NUM_THREADS=1 python benchmarks/explain.py            # both datasets, ~10 min on one thread

Results: a table per dataset on stdout and in ``benchmarks/results/explain.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from distillset.core.config import load_yaml
from distillset.core.data import grouped_spec, parse_grouped
from distillset.core.runtime import get_runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run
from distillset.relabel.explain import ExplainConfig, format_paired, format_table, paired
from distillset.relabel.explain import run as explain_run
from distillset.squeeze.train import SqueezeConfig
from distillset.squeeze.train import run as squeeze_run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {  # data, recipe (its grouping), classifier, its epochs, DM real batch, test images per class and seed
    "cifar10": (f"npz:{SHARED / 'cifar10.npz'}", "explain_cifar10.yaml", "convnet3_bn", 6, 128, 2),
    "tiny10": (f"npz:{SHARED / 'tinyimagenet10_64.npz'}", "explain_tiny10.yaml", "convnet4_bn", 20, 64, 1),
}


COARSE = [  # the coarse sets whose images serve as the distilled baseline: (folder, row label, pick)
    ("dm1", "distilled (DM, IPC 1)", "first"),
    ("dm10", "distilled (DM, IPC 10, nearest)", "nearest"),
    ("rded1", "distilled (RDED, IPC 1)", "first"),
    ("real1", "real image of the group (random, IPC 1)", "first"),
]


def groups_of(recipe: str) -> dict:
    spec = load_yaml(ROOT / "recipes" / recipe)["recover"]["data"]
    return parse_grouped(spec.removeprefix("grouped:"))[0]


def part_rows(folder: Path, rename: dict) -> list[dict]:
    """The per-image rows an explain run kept in ``parts/``, baselines renamed (to tell the coarse sets apart)."""
    rows = []
    for f in sorted((folder / "parts").glob("*.json")):
        rows += [{**r, "baseline": rename.get(r["baseline"], r["baseline"])} for r in json.loads(f.read_text())["rows"]]
    return rows


CURVES = ["deletion_mean", "insertion_mean", "deletion_blur", "insertion_blur"]


def compact(summary: dict, pairs: dict) -> str:
    """The docs' tables: fewer columns, three decimals; paired rows as difference (share of images better)."""
    cols = [*CURVES, "abs_delta", "infidelity", "sensitivity", "object_mass"]
    curves = "deletion, mean fill | insertion, mean fill | deletion, blur fill | insertion, blur fill"
    lines = [f"| baseline | {curves} | \\|delta\\| | infidelity | sensitivity | mass in box |",
             "| --- |" + " --- |" * len(cols)]
    for name, m in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]['mean']:.3f} +- {m[c]['std']:.3f}" if c in m else ""
                                                 for c in cols) + " |")
    lines += ["", f"| paired | {curves} | sensitivity |", "| --- |" + " --- |" * 5]
    for name, m in pairs.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]['mean']:+.3f} ({100 * m[c]['better']:.0f} %)"
                                                 for c in [*CURVES, "sensitivity"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="cifar10,tiny10")
    p.add_argument("--root", default="/tmp/distillset_explain")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dm-iterations", type=int, default=50)
    p.add_argument("--images-per-class", type=int, default=0, help="0 = the dataset's default (CPU budget)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-steps", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explain.md"))
    a = p.parse_args()
    torch.set_num_threads(1)
    rt = get_runtime()
    sections = []
    for name in a.datasets.split(","):
        t0 = time.time()
        data, recipe, arch, epochs, batch_real, per_class = DATASETS[name]
        per_class = a.images_per_class or per_class
        groups = groups_of(recipe)
        root = Path(a.root) / name
        teacher = root / "squeeze"
        metrics = squeeze_run(SqueezeConfig(out=str(teacher), data=data, arch=arch, model_kwargs={"width": a.width},
                                            epochs=epochs, batch_size=64, lr=0.05), rt)
        coarse = grouped_spec(groups, data)
        common = {"data": coarse, "param_options": {"init": "real"}, "augmentation": "none", "classes_per_unit": 1}
        dm = {"method": "dm", "iterations": a.dm_iterations, "optimizer": "sgd", "lr": 1.0, "momentum": 0.5,
              "schedule": "constant", "options": {"batch_real": batch_real, "aug": "dsa", "width": a.width}}
        sets = {"dm1": {**common, **dm, "ipc": 1}, "dm10": {**common, **dm, "ipc": 10},
                "real1": {**common, "method": "random", "ipc": 1}}
        # RDED needs a teacher of the groups: a coarse classifier trained by squeeze on the grouped source
        coarse_teacher = root / "squeeze_coarse"
        coarse_metrics = squeeze_run(SqueezeConfig(out=str(coarse_teacher), data=coarse, arch=arch, model_kwargs={"width": a.width},
                                                   epochs=max(2, epochs // 2), batch_size=64, lr=0.05), rt)
        sets["rded1"] = {"data": coarse, "teachers": [str(coarse_teacher)], "method": "rded", "ipc": 1,
                         "augmentation": "none", "options": {"factor": 1, "min_scale": 0.5}}
        for key, kw in sets.items():
            recover_run(RecoverConfig(out=str(root / key), **kw), rt)
        base = ExplainConfig(out=str(root / "explain"), teachers=[str(teacher)], distilled=str(root / "dm1"),
                             data=data, images_per_class=per_class, seeds=a.seeds, n_steps=a.n_steps,
                             infidelity_samples=8, sensitivity_samples=2)
        main_run = explain_run(base, rt)
        summary = dict(main_run["summary"])
        distilled_row = summary.pop("distilled")
        reference = summary.pop("random order (reference)")
        summary["distilled (DM, IPC 1)"] = distilled_row
        rows = part_rows(root / "explain", {})
        for key, label, pick in COARSE[1:]:
            r = explain_run(dataclasses.replace(base, out=str(root / f"explain_{key}"), distilled=str(root / key),
                                                baselines=["distilled"], pick=pick), rt)
            summary[label] = r["summary"]["distilled"]
            rows += part_rows(root / f"explain_{key}", {"distilled": label})
        summary["random order (reference)"] = reference
        table = format_table(base, summary, main_run["object_box_chance"])
        # every coarse baseline paired with every standard one and with each other, on the very same images
        every = [*base.baselines, *(label for _, label, _ in COARSE[1:])]
        pairs = {}
        for of in ["distilled", *every[-len(COARSE) + 1:]]:
            for k, v in paired(base, rows, of, every).items():
                other = k.split(" - ", 1)[1]
                if other in ("black", "mean", "blur", "uniform") or ("real" in other and "real" not in of):
                    pairs[k.replace("distilled - ", "distilled (DM, IPC 1) - ", 1)] = v
        table += "\n\n" + format_paired(base, pairs)
        head = (f"### {name}: groups {', '.join(f'{g} ({len(v)})' for g, v in groups.items())}; classifier {arch} "
                f"width {a.width}, test top-1 {100 * metrics['test_top1']:.1f} % (RDED's coarse teacher "
                f"{100 * coarse_metrics['test_top1']:.1f} %); {main_run['images']} test images "
                f"({per_class} per class x {a.seeds} seeds), IG {a.n_steps} steps (Gauss-Legendre), "
                f"{time.time() - t0:.0f} s")
        sections.append(head + "\n\n" + table + "\n\ncompact (docs/benchmarks.md):\n\n" + compact(summary, pairs))
        print(sections[-1] + "\n", flush=True)
    text = "\n\n".join(sections) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("## explain: IG baselines (benchmarks/explain.py)\n\n" + text)


if __name__ == "__main__":
    main()
