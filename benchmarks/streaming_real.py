"""Peak memory and wall time of `recover` reading real images class by class (indexed shards) vs loading the whole
training split, at two dataset sizes 10x apart (1,000 synthetic classes).

Each run is a fresh subprocess reporting ``ru_maxrss`` after recover, so imports are counted alike. The method is DM
from real initialisation (per-class real batches every step, no teacher), on the first ``--classes`` classes, as a
user distilling a class range of ImageNet-1K on one machine would run it.

    OMP_NUM_THREADS=1 python benchmarks/streaming_real.py --sizes 20,200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import publish, run_child

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from distillset.core.runtime import Runtime
from distillset.recover.config import RecoverConfig
from distillset.recover.engine import run
data, out, stream, classes = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
t0 = time.perf_counter()
run(RecoverConfig(out=out, data=data, method="dm", ipc=1, iterations=2, param_options={{"init": "real"}},
                  augmentation="none", classes_per_unit=50, max_classes=classes, options={{"width": 16,
                  "batch_real": 32}}, autocast="none", stream_real=stream, log_every=1000),
    Runtime(None, 0, 1, torch.device("cpu")))
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}}))
"""


def main() -> None:
    from benchmarks.make_synthetic_1k import make_synthetic
    from distillset.core.data import WdsShards
    from distillset.launch.shards import ShardsIndexConfig, run_index

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/distillset_stream")
    p.add_argument("--sizes", default="20,200", help="images per class of the two datasets")
    p.add_argument("--classes", type=int, default=100, help="classes distilled (the first N of 1,000)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming_real.md"))
    a = p.parse_args()
    root = Path(a.root)
    t0 = time.time()
    rows = []
    for per in (int(s) for s in a.sizes.split(",")):
        shards = root / f"shards_{per}"
        if not (shards / "_info.json").exists():
            make_synthetic(shards, 1000, per_class=per, test_per_class=1, size=16, shard_size=1000)
        if not WdsShards(str(shards)).info["splits"]["train"].get("class_index"):
            t = time.perf_counter()
            run_index(ShardsIndexConfig(data=f"wds:{shards}", splits=["train"]))
            print(f"index of {1000 * per} images written in {time.perf_counter() - t:.1f} s", flush=True)
        for stream in (1, 0):
            out = root / f"run_{per}_{stream}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            r = run_child(CHILD.format(root=str(ROOT)), f"wds:{shards}", str(out), str(stream), str(a.classes),
                          env={"DISTILLSET_PROGRESS": "0"})
            rows.append({"mode": "class by class (index)" if stream else "whole split", "images": 1000 * per, **r})
            print(rows[-1], flush=True)
    lines = ["# recover: real images class by class vs the whole split", "",
             (f"Command: `OMP_NUM_THREADS=1 python benchmarks/streaming_real.py --sizes {a.sizes} --classes "
              f"{a.classes}` (wall {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}). 1,000 synthetic "
              f"classes at 16 px (`benchmarks/make_synthetic_1k.py`); DM from real init, IPC 1, 2 iterations, the "
              f"first {a.classes} classes in units of 50, batch_real 32; peak RSS of a fresh process (torch "
              "included)."), "",
             "| real images | dataset images | peak RSS (MB) | seconds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['images']:,} | {r['maxrss_mb']:.0f} | {r['seconds']:.1f} |")
    lines.append("")
    publish(a.out, lines)


if __name__ == "__main__":
    main()
