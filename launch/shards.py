"""``distillset shards``: write any source as webdataset shards (how an ImageNet folder becomes shards).

Output: ``OUT/{split}-{k:06d}.tar`` (``KEY.png`` or the original encoded bytes, ``KEY.cls``) and a timm-readable
``OUT/_info.json`` (``splits.{split}.{name, num_samples, filenames, shard_lengths}``) plus ``class_names`` and
``image_shape``. Shards are written atomically and split across processes; a re-run skips finished shards.

Each split also gets a per-class index (``_classes-{split}.npy`` + ``{split}.wids.json``, see
:mod:`distillset.core.classindex`) so that a method reads one class without reading the others;
``distillset shards index`` writes it for shards made elsewhere.
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
        index: also write the per-class index of every split (one more streaming pass over the shards).
    """

    data: str = "digits"
    out: str = "output/shards"
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    maxcount: int = 1000
    image_size: int = 0
    shuffle: bool = True
    seed: int = 0
    index: bool = True

    def __post_init__(self):
        if self.maxcount < 1:
            raise DistillError("maxcount must be >= 1.")


@dataclass
class ShardsIndexConfig:
    """Write the per-class index of existing webdataset shards (in their folder, beside ``_info.json``).

    Attributes:
        data: the shards, ``wds:FOLDER`` (a folder with ``_info.json``).
        splits: splits to index (those the shards have, by default).
    """

    data: str = ""
    splits: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.data.startswith("wds:"):
            raise DistillError(f"--data '{self.data}' is not webdataset shards; give wds:FOLDER (a folder with "
                               "_info.json, as `distillset shards` writes).")


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

    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
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
        if cfg.index:
            from distillset.core.data import WdsShards

            _index(WdsShards(str(out)), list(info["splits"]))
    rt.wait()
    return read_json(out / "_info.json")


def _index(shards, splits: list[str]) -> dict:
    """Write the class index of ``splits`` of a :class:`~distillset.core.data.WdsShards` folder; record it."""
    from distillset.core.classindex import write_index

    folder = shards.folder
    info = dict(shards.info)
    for split in splits:
        if split not in info.get("splits", {}):
            raise DistillError(f"shards in {folder} have no '{split}' split (have {sorted(info.get('splits', {}))}).")
        info["splits"][split] = {**info["splits"][split], **write_index(shards, split)}
    write_json(folder / "_info.json", info)  # the index is recorded only once its files are complete
    return info


def run_index(cfg: ShardsIndexConfig, rt=None) -> dict:
    """``distillset shards index``: the per-class index of each split, written beside the shards."""
    from distillset.core.data import WdsShards

    rt = rt or get_runtime()
    arg = cfg.data[len("wds:"):]
    shards = WdsShards(arg)
    if not Path(arg).is_dir():
        raise DistillError(f"give the shards' folder (wds:{shards.folder}), not a pattern: the index covers a split's "
                           "shards as _info.json lists them.")
    splits = cfg.splits or list(shards.info.get("splits", {}))
    info = _index(shards, splits) if rt.is_main else None
    rt.wait()
    return info or read_json(shards.folder / "_info.json")


def _probe_shape(out: Path, info: dict) -> list[int]:
    """Image shape of the first sample of the first shard (the files may be copied, not decoded)."""
    from distillset.core.data import decode_sample, read_tar_samples

    split = next(iter(info["splits"]))
    first = next(read_tar_samples(str(out / info["splits"][split]["filenames"][0])))
    return list(decode_sample(first, len(info["class_names"]))[0].shape)
