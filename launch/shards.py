"""``distillset shards``: write any source as webdataset shards (how an ImageNet folder becomes shards).

Output: ``OUT/{split}-{k:06d}.tar`` (``KEY.png`` or the original encoded bytes, ``KEY.cls``) and a timm-readable
``OUT/_info.json`` (``splits.{split}.{name, num_samples, filenames, shard_lengths}``) plus ``class_names`` and
``image_shape``. Shards are written atomically and split across processes; a re-run skips finished shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillset.core.data import Source, folder_files, member_name, read_image_file, write_shard
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path, read_json, write_json
from distillset.core.runtime import get_runtime, progress

log = logging.getLogger("distillset.shards")


@dataclass
class ShardsConfig:
    """Convert a source into webdataset shards.

    Attributes:
        data: source spec (digits, npz:PATH, folder:PATH, hf:PATH).
        out: output folder.
        splits: splits to write.
        maxcount: samples per shard.
        image_size: resize (shorter side + centre crop) to this size; 0 keeps the size (a folder's encoded files are
            then copied byte for byte, no re-encoding).
        shuffle: shuffle the training split before sharding (seeded), so sequential shard reads are class-mixed.
        seed: shuffle seed.
    """

    data: str = "digits"
    out: str = "output/shards"
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    maxcount: int = 1000
    image_size: int = 0
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.maxcount < 1:
            raise DistillError("maxcount must be >= 1.")


def _records(source: Source, split: str, image_size: int):
    """Lazy records: a callable per sample giving (image uint8 | (bytes, ext), label)."""
    if source.kind == "folder":
        classes, items = folder_files(Path(source.arg), split)
        if image_size:
            return classes, [(lambda f=f: torch.from_numpy(read_image_file(f, image_size)), c) for f, c in items]
        return classes, [(lambda f=f: (f.read_bytes(), f.suffix.lower().lstrip(".")), c) for f, c in items]
    if source.kind == "wds":
        raise DistillError("the source is already webdataset shards; use it directly as wds:PATH.")
    s = source.load(split)
    return s.class_names, [(lambda i=i: s.images[i], int(s.labels[i])) for i in range(len(s))]


def _write_raw_shard(path: Path, samples: list[tuple[str, bytes, str, int]]) -> None:
    import io
    import tarfile

    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for key, data, ext, label in samples:
                for e, payload in ((ext, data), ("cls", str(label).encode())):
                    ti = tarfile.TarInfo(member_name(key, e))
                    ti.size, ti.mtime, ti.mode = len(payload), 0, 0o644
                    tar.addfile(ti, io.BytesIO(payload))


def run(cfg: ShardsConfig, rt=None) -> dict:
    rt = rt or get_runtime()
    out = Path(cfg.out)
    source = Source(cfg.data, cfg.image_size or None)
    info: dict = {"name": cfg.data, "splits": {}}
    for split in cfg.splits:
        classes, records = _records(source, split, cfg.image_size)
        if not records:
            raise DistillError(f"source '{cfg.data}' has no {split} images.")
        order = list(range(len(records)))
        if cfg.shuffle and split == "train":
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_shards = (len(order) + cfg.maxcount - 1) // cfg.maxcount
        names = [f"{split}-{k:06d}.tar" for k in range(n_shards)]
        for k in progress(range(n_shards), desc=f"shards {split}", enabled=rt.is_main):
            if k % rt.world != rt.rank or (out / names[k]).exists():
                continue
            chunk = order[k * cfg.maxcount:(k + 1) * cfg.maxcount]
            samples = []
            for i in chunk:
                value, label = records[i][0](), records[i][1]
                samples.append((f"{split}_{i:08d}", value, label))
            if isinstance(samples[0][1], tuple):
                _write_raw_shard(out / names[k], [(key, v[0], v[1], lab) for key, v, lab in samples])
            else:
                write_shard(out / names[k], [(key, v, lab, None) for key, v, lab in samples])
        lengths = [len(order[k * cfg.maxcount:(k + 1) * cfg.maxcount]) for k in range(n_shards)]
        info["splits"][split] = {"name": split, "num_samples": len(order), "filenames": names,
                                 "shard_lengths": lengths}
        info["class_names"] = classes
    info["num_classes"] = len(info["class_names"])
    rt.wait()
    if rt.is_main:
        info["image_shape"] = _probe_shape(out, info)
        write_json(out / "_info.json", info)
        log.info("shards: wrote %s", {s: v["num_samples"] for s, v in info["splits"].items()})
    rt.wait()
    return read_json(out / "_info.json")


def _probe_shape(out: Path, info: dict) -> list[int]:
    """Image shape of the first sample of the first shard (the files may be copied, not decoded)."""
    from distillset.core.data import decode_sample, read_tar_samples

    split = next(iter(info["splits"]))
    first = next(read_tar_samples(str(out / info["splits"][split]["filenames"][0])))
    return list(decode_sample(first, len(info["class_names"]))[0].shape)
