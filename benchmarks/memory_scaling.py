"""Peak memory of `squeeze stats` (streamed) and `relabel` at two dataset sizes 10x apart (1,000 classes).

Each measurement runs in a fresh subprocess and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the
stage, so imports and the model are counted the same way at both sizes.

    OMP_NUM_THREADS=1 python benchmarks/memory_scaling.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import publish, run_child

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from distillset.core.runtime import Runtime
rt = Runtime(None, 0, 1, torch.device("cpu"))
stage, data, teacher, folder = sys.argv[1:5]
if stage == "stats":
    from distillset.squeeze.statistics import StatsConfig, run
    res = run(StatsConfig(teacher=teacher, data=data, out=folder + "/stats.safetensors", batch_size=256,
                          class_conditional=True, checkpoint_every=0), rt)
elif stage == "relabel":
    from distillset.relabel.softlabels import RelabelConfig, run
    res = run(RelabelConfig(distilled=folder, teachers=[teacher], epochs=20, topk=10, epochs_per_file=5,
                            batch_size=256, autocast="none"), rt)
else:  # the in-memory way (all images loaded, each epoch block's labels held), for comparison
    import time
    from distillset.core.distilled import load_distilled
    from distillset.relabel.softlabels import RelabelConfig, generate
    from distillset.squeeze.checkpoint import load_teacher
    t0 = time.perf_counter()
    cfg = RelabelConfig(distilled=folder, epochs=20, topk=10, epochs_per_file=5, batch_size=256, autocast="none")
    images, _ = load_distilled(folder)
    t = load_teacher(teacher)
    blocks = [generate(images, [t], cfg, rt.device, range(s, s + 5), show_progress=False) for s in range(0, 20, 5)]
    res = {{"seconds": time.perf_counter() - t0}}
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **res}}))
"""


def as_distilled(shards: Path, folder: Path, teacher: str) -> None:
    """A distilled-set folder (manifest + image shards) holding the synthetic training images, for relabel."""
    import io
    import tarfile

    from distillset.core.data import read_tar_samples
    from distillset.core.io import read_json, write_json

    info = read_json(shards / "_info.json")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n = 0
    for k, f in enumerate(sorted(shards.glob("train-*.tar"))):
        # keys sorted within each shard, as recover writes them (relabel merges shards by key while streaming)
        samples = sorted(read_tar_samples(str(f)), key=lambda s: s["__key__"])
        n += len(samples)
        with tarfile.open(folder / "images" / f"shard-{k:06d}.tar", "w") as tar:
            for sample in samples:
                for ext, data in sorted((e, d) for e, d in sample.items() if not e.startswith("__")):
                    member = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    write_json(folder / "manifest.json", {"format": "distillset/1", "status": "complete", "method": "copy",
                                          "class_names": info["class_names"], "ipc": 1, "num_images": n,
                                          "teachers": [{"path": teacher}], "image_shape": info["image_shape"]})


def main() -> None:
    from benchmarks.make_synthetic_1k import make_synthetic
    from tests.test_scale_stats import make_teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/distillset_mem")
    p.add_argument("--sizes", default="2,20", help="images per class of the two runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_scaling.md"))
    a = p.parse_args()
    root = Path(a.root)
    t0 = time.time()
    teacher = None
    rows = []
    for per in (int(s) for s in a.sizes.split(",")):
        shards = root / f"shards_{per}"
        if not (shards / "_info.json").exists():
            make_synthetic(shards, 1000, per_class=per, test_per_class=1, size=16, shard_size=1000)
        if teacher is None:
            teacher = make_teacher(root / "teacher", "convnet3_bn", num_classes=1000, img_size=16, width=32)
        folder = root / f"distilled_{per}"
        if not (folder / "manifest.json").exists():
            as_distilled(shards, folder, teacher)
        for stage in ("stats", "relabel", "relabel_inmemory"):
            if stage == "relabel" and (folder / "labels").exists():
                import shutil

                shutil.rmtree(folder / "labels")
            res = run_child(CHILD.format(root=str(ROOT)), stage, f"wds:{shards}", teacher, str(folder))
            rows.append({"stage": stage, "images": 1000 * per, **res})
            print(rows[-1], flush=True)
    lines = ["# Peak memory vs dataset size", "",
             (f"Command: `OMP_NUM_THREADS=1 python benchmarks/memory_scaling.py --sizes {a.sizes}` "
             f"(wall time {time.time() - t0:.0f} s). 1,000 synthetic classes, 16 px, ConvNet-3 BN (width 32) teacher; "
             "stats: batch 256, class-conditional + 4x4 patch statistics, streamed from wds shards; relabel: 20 "
             "epochs, top-10, 5 epochs per file, batch 256 (`relabel.softlabels.run`, streamed); relabel_inmemory: "
             "the same labels made the in-memory way (load_distilled + generate, each block's labels held) for "
             "comparison. Peak RSS of a fresh process per run (includes torch itself)."), "",
             "| stage | images | peak RSS (MB) | seconds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['images']} | {r['maxrss_mb']:.0f} | {r['seconds']:.1f} |")
    lines.append("")
    publish(a.out, lines)


if __name__ == "__main__":
    main()
