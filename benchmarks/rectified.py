"""One rectified benchmark: every method distilled from the same teacher and evaluated by the same student recipe.

A ConvNet-3 (BN) teacher is trained on the data; each row (a recover method with its options) distils IPC images per
class from it; every set is relabelled by that teacher (FKD soft labels) and evaluated by the same students (SRe2L
protocol, soft and hard labels, several seeds) beside random real images at the same IPC, with the wall time per
image of the method and the within-class diversity of the set. Rows are ``NAME=METHOD`` plus optional JSON recover
overrides, so a new method is a new ``--row`` (no code change):

    OMP_NUM_THREADS=2 python benchmarks/rectified.py --data npz:../shared/data/cifar10.npz --ipc 10 \\
        --row 'rded=rded' --row 'sre2l=sre2l{"iterations": 300}'

Results: a table on stdout and ``benchmarks/results/rectified_<data>.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from distillset.core.runtime import get_runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run as recover_run
from distillset.relabel.evaluate import EvaluateConfig
from distillset.relabel.evaluate import run as evaluate_run
from distillset.relabel.softlabels import RelabelConfig
from distillset.relabel.softlabels import run as relabel_run
from distillset.squeeze.train import SqueezeConfig
from distillset.squeeze.train import run as squeeze_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_ROWS = [
    "random=random",
    "herding=herding",
    'sre2l=sre2l{"iterations": 300, "aug_options": {"milestone": 0}}',
    'cda=sre2l{"iterations": 300}',
    'sre2l_real_init=sre2l{"iterations": 300, "param_options": {"init": "real"}}',
    'rded=rded{"options": {"factor": 1}}',
    'rded_f2=rded{"options": {"factor": 2}}',
]


def parse_row(spec: str) -> tuple[str, str, dict]:
    m = re.fullmatch(r"([\w.-]+)=(\w+)(\{.*\})?", spec.strip())
    if not m:
        raise SystemExit(f"--row expects NAME=METHOD or NAME=METHOD{{json}}, got {spec!r}")
    return m.group(1), m.group(2), json.loads(m.group(3)) if m.group(3) else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"npz:{SHARED / 'cifar10.npz'}")
    p.add_argument("--root", default="/tmp/distillset_rectified")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200, help="student epochs (and stored soft-label epochs)")
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--row", action="append", default=[], help="NAME=METHOD{json recover overrides}")
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = [parse_row(r) for r in (a.row or DEFAULT_ROWS)]
    rt = get_runtime()
    t_all = time.time()
    tag = Path(a.data.split(":", 1)[-1]).stem
    root = Path(a.root) / tag
    teacher = train_teacher(a.data, root, a.teacher_width, a.teacher_epochs, 0, rt)
    table = [run_row(name, method, overrides, a.data, root, teacher, a.ipc, a.epochs, a.students, rt)
             for name, method, overrides in rows]
    lines = render(table, a, time.time() - t_all)
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"rectified_{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def train_teacher(data: str, root: Path, width: int, epochs: int, image_size: int, rt) -> Path:
    """The one ConvNet-3 BN teacher every row distils from and is relabelled by (cached in ``root/teacher``)."""
    teacher = root / "teacher"
    squeeze_run(SqueezeConfig(out=str(teacher), data=data, arch="convnet3_bn", model_kwargs={"width": width},
                              epochs=epochs, batch_size=128, lr=0.05, image_size=image_size), rt)
    return teacher


def run_row(name: str, method: str, overrides: dict, data: str, root: Path, teacher: Path, ipc: int, epochs: int,
            students: int, rt, baseline: bool = True) -> dict:
    """One row: distil, relabel with the teacher, evaluate students (beside random real images at the same IPC
    unless ``baseline`` is off: a driver whose ``random`` row is the baseline trains its students once)."""
    folder = root / f"{name}_ipc{ipc}"
    base = {"out": str(folder), "data": data, "teachers": [str(teacher)], "method": method, "ipc": ipc,
            "classes_per_unit": 10}
    manifest = recover_run(RecoverConfig(**{**base, **overrides}), rt)
    # the method's own time: every run that wrote units of this set (a resumed benchmark adds its skips, ~0 s)
    seconds = sum(max(r["seconds"] for r in run["ranks"]) for run in manifest["runs"])
    relabel_run(RelabelConfig(distilled=str(folder), epochs=epochs, topk=10, epochs_per_file=epochs), rt)
    m = evaluate_run(EvaluateConfig(distilled=str(folder), students=students, epochs=epochs, labels="both",
                                    batch_size=50, baseline=baseline), rt)
    by = {(s["set"], s["labels"]): s for s in m["summary"]}
    print(name, {k: round(100 * v["mean"], 2) for k, v in by.items()}, flush=True)
    return {"name": name, "method": method, "overrides": overrides, "by": by,
            "seconds_per_image": seconds / max(1, manifest["num_images"]), "diversity": m["diversity"],
            "full": m.get("full_data_top1")}


def _div(d: dict, key: str, digits: int) -> str:
    """``distilled (random)`` diversity, ``-`` where undefined (IPC 1)."""
    def one(x):
        return f"{x[key]:.{digits}f}" if key in x else "-"
    return f"{one(d.get('distilled', {}))} ({one(d.get('random', {}))})"


def render(table: list[dict], a, wall: float, command: str = "") -> list[str]:
    """The table (markdown lines); ``command`` replaces the rectified.py command line (another driver's)."""
    full = next((r["full"] for r in table if r["full"] is not None), None)
    rows_arg = " ".join(f"--row '{r['name']}={r['method']}{json.dumps(r['overrides']) if r['overrides'] else ''}'"
                        for r in table)
    command = command or (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/rectified.py --data {a.data} "
                          f"--ipc {a.ipc} --teacher-epochs {a.teacher_epochs} --teacher-width {a.teacher_width} "
                          f"--epochs {a.epochs} --students {a.students} {rows_arg}")
    lines = [f"# Rectified benchmark ({a.data.split(':', 1)[-1].split('/')[-1]}, IPC {a.ipc})", "",
             f"Command: `{command}` (wall time {wall:.0f} s).", "",
             f"One ConvNet-3 BN teacher (width {a.teacher_width}, {a.teacher_epochs} epochs; test top-1 "
             f"{100 * full:.2f}); " if full is not None else "One ConvNet-3 BN teacher; ",
             (f"every set relabelled by it (top-10 soft labels, {a.epochs} epochs) and evaluated by the same ConvNet-3 "
             f"students (SRe2L protocol: AdamW, cosine, {a.epochs} epochs, {a.students} seeds, batch 50), beside "
             "random real images at the same IPC under the identical protocol. Diversity: mean pairwise distance "
             "within a class (pixels / teacher features)."), "",
             ("| method | distilled soft | random soft | distilled hard | random hard | s / image | diversity pixel "
             "(random) | diversity feature (random) |"), "|---|---|---|---|---|---|---|---|"]
    lines += table_lines(table)
    return lines


def table_lines(table: list[dict]) -> list[str]:
    """The markdown rows of ``table`` (one per method)."""
    def cell(row, key):
        s = row["by"].get(key)
        return f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}" if s else "-"

    lines = []
    for r in table:
        d = r["diversity"]
        lines.append(f"| {r['name']} | {cell(r, ('distilled', 'soft'))} | {cell(r, ('random', 'soft'))} | "
                     f"{cell(r, ('distilled', 'hard'))} | {cell(r, ('random', 'hard'))} | "
                     f"{r['seconds_per_image']:.3f} | {_div(d, 'pixel', 3)} | {_div(d, 'feature', 2)} |")
    return lines


if __name__ == "__main__":
    main()
