"""A synthetic ImageNet-1K stand-in: 1,000 classes of small images as webdataset shards + ``_info.json``.

Each class has a fixed colour (three base-10 digits of the class id -> three channel levels) and a stripe
orientation/frequency (the class id mod 4 / mod 3), plus per-image noise and a random shift, so a small model can
learn something and every class differs. The layout is the one ``wds:`` sources read (and ``distillset shards``
writes): ``train-{000000..N}.tar``, ``test-{...}.tar`` and ``_info.json`` with ``splits``, ``class_names`` and
``image_shape``.

    python benchmarks/make_synthetic_1k.py --out /tmp/syn1k --per-class 2 --size 16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillset.core.data import write_shard
from distillset.core.io import write_json


def class_images(c: int, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``n`` uint8 images (n, 3, size, size) of class ``c``."""
    colour = torch.tensor([(c % 10) / 9, (c // 10 % 10) / 9, (c // 100 % 10) / 9]).view(1, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    angle = (c % 4) * math.pi / 4
    freq = 2 * math.pi * (1 + c % 3) / size
    shift = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    stripes = torch.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle))[None] + shift)  # (n, H, W)
    x = 0.7 * colour + 0.25 * stripes[:, None] + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def make_synthetic(out: str | Path, num_classes: int = 1000, per_class: int = 2, test_per_class: int = 1,
                   size: int = 16, shard_size: int = 1000, seed: int = 0) -> dict:
    """Write the shards and ``_info.json`` into ``out``; returns the info. Samples are shuffled across shards."""
    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    info: dict = {"name": f"synthetic-{num_classes}", "splits": {}, "class_names": [f"class{c:04d}" for c in
                                                                                    range(num_classes)],
                  "num_classes": num_classes, "image_shape": [3, size, size]}
    for split, n in (("train", per_class), ("test", test_per_class)):
        images = torch.cat([class_images(c, n, size, g) for c in range(num_classes)])
        labels = torch.arange(num_classes).repeat_interleave(n)
        order = torch.randperm(len(labels), generator=g)
        shards = max(1, math.ceil(len(order) / shard_size))
        for k in range(shards):
            part = order[k * shard_size:(k + 1) * shard_size].tolist()
            write_shard(out / f"{split}-{k:06d}.tar", [(f"{split}_{i:08d}", images[i], int(labels[i]), None)
                                                       for i in part])
        info["splits"][split] = {"name": split, "num_samples": len(order),
                                 "filenames": f"{split}-{{000000..{shards - 1:06d}}}.tar"}
    write_json(out / "_info.json", info)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=1)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1000)
    a = p.parse_args()
    info = make_synthetic(a.out, a.classes, a.per_class, a.test_per_class, a.size, a.shard_size)
    print({s: v["num_samples"] for s, v in info["splits"].items()}, "->", a.out)


if __name__ == "__main__":
    main()
