"""A per-class index of webdataset shards: read one class's images without reading the others.

``distillset shards`` (and ``distillset shards index`` for shards made elsewhere) writes, beside the shards, one
``_classes-{split}.npy`` per split: the label of every sample in shard order (int32; 5 MB for ImageNet-1K's 1.28M
images, read memory-mapped), and records it in ``_info.json`` (``splits.{split}.class_index``) with the split's exact
channel statistics. Random access into a shard is wids' indexed tar reader (:class:`wids.wids.IndexedTarSamples`, an mmap
of the tar with an index of its members built when it is opened), held in a small LRU of open shards, so memory is
bounded by the classes a caller holds, never by the dataset.

wids' :class:`~wids.ShardListDataset` is not used for reading: it caches shards under ``/tmp`` and writes lock files
beside them, and a command must not write outside the folders it was given (shared datasets are often read-only).
Each split also gets a ``{split}.wids.json`` descriptor, so a user can open the same shards with it directly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from distillset.core.errors import DistillError

log = logging.getLogger("distillset.classindex")

INDEX_FORMAT = "distillset-class-index/1"
_SCAN = 1 << 20  # labels scanned per chunk: memory of a class lookup is its positions, not the dataset's labels


def index_name(split: str) -> str:
    return f"_classes-{split}.npy"


def _tar_samples(url: str):
    try:
        from wids.wids import IndexedTarSamples
    except ImportError:  # pragma: no cover - a dependency of distillset
        raise DistillError("per-class reads need the 'wids' package (webdataset's indexed shards); pip install wids."
                           ) from None
    try:
        return IndexedTarSamples(path=url)
    except Exception as e:  # noqa: BLE001  (a damaged tar raises from deep inside the header parser)
        raise DistillError(f"shard {url} cannot be indexed ({type(e).__name__}: {e}); re-create it with "
                           "`distillset shards`.") from None


def _bytes(v) -> bytes:
    """A member's payload as bytes (wids hands out file-like views into the mmap)."""
    return v.getvalue() if hasattr(v, "getvalue") else bytes(v)


class ClassIndex:
    """Per-class random access into one split of a :class:`~distillset.core.data.WdsShards` folder.

    Positions are global sample numbers in shard order (shard 0's samples, then shard 1's, ...), the order in which
    the split streams and loads, so a per-class reader picks exactly the images an in-memory load would.
    """

    def __init__(self, shards, split: str, open_shards: int = 32):
        entry = shards.info.get("splits", {}).get(split, {})
        name = entry.get("class_index")
        if not name:
            raise DistillError(f"shards in {shards.folder} have no class index for '{split}'; write it with "
                               f"`distillset shards index --data wds:{shards.folder}`.")
        from distillset.core.io import inside

        path = inside(shards.folder, name, f"_info.json split '{split}' class_index")
        if not path.exists():
            raise DistillError(f"the class index {path} is missing; write it again with `distillset shards index "
                               f"--data wds:{shards.folder}`.")
        self.labels = np.load(path, mmap_mode="r")
        self.urls = shards.urls(split)
        lengths = entry.get("shard_lengths")
        if not lengths or len(lengths) != len(self.urls) or sum(lengths) != len(self.labels):
            raise DistillError(f"the class index {path} does not match the shards ({len(self.labels)} labels, "
                               f"shard lengths {lengths and sum(lengths)}); the shards changed after it was written: "
                               f"run `distillset shards index --data wds:{shards.folder}` again.")
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_classes = len(shards.class_names)
        self.mean, self.std = entry.get("mean"), entry.get("std")
        self.where = str(shards.folder)
        self._open: OrderedDict[int, object] = OrderedDict()
        self._max_open = max(1, open_shards)

    def __len__(self) -> int:
        return len(self.labels)

    def positions(self, c: int) -> torch.Tensor:
        """Global positions of class ``c``'s samples, ascending (the labels are scanned in chunks)."""
        parts = [np.flatnonzero(self.labels[s:s + _SCAN] == c) + s for s in range(0, len(self.labels), _SCAN)]
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros(0, dtype=torch.long)

    def counts(self) -> np.ndarray:
        """Samples per class."""
        total = np.zeros(self.num_classes, dtype=np.int64)
        for s in range(0, len(self.labels), _SCAN):
            total += np.bincount(np.asarray(self.labels[s:s + _SCAN]), minlength=self.num_classes)[: self.num_classes]
        return total

    def _shard(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        tar = _tar_samples(self.urls[k])
        if len(tar) != self.starts[k + 1] - self.starts[k]:
            raise DistillError(f"shard {self.urls[k]} holds {len(tar)} samples but the index says "
                               f"{self.starts[k + 1] - self.starts[k]}; run `distillset shards index` again.")
        self._open[k] = tar
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)[1].close()
        return tar

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``positions`` (in that order), decoded from their shards."""
        from distillset.core.data import decode_sample

        pos = positions.cpu().numpy().astype(np.int64)
        if len(pos) == 0:
            raise DistillError("no samples asked for")
        shard = np.searchsorted(self.starts, pos, side="right") - 1
        out: list[torch.Tensor | None] = [None] * len(pos)
        for k in np.unique(shard):  # each shard opened once per call, its samples read in any order
            tar = self._shard(int(k))
            for j in np.flatnonzero(shard == k):
                raw = tar[int(pos[j] - self.starts[k])]
                sample = {key.lstrip(".").lower(): _bytes(v) for key, v in raw.items() if not key.startswith("__")}
                sample.update(__key__=raw["__key__"], __url__=self.urls[k])
                image, label = decode_sample(sample, self.num_classes)
                if label != int(self.labels[pos[j]]):
                    raise DistillError(f"shard {self.urls[k]} sample '{raw['__key__']}' has label {label} but the "
                                       "class index says "
                                       f"{int(self.labels[pos[j]])}; run `distillset shards index` again.")
                out[j] = image
        return torch.stack(out)

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()


def write_index(shards, split: str) -> dict:
    """Stream ``split`` once; write its labels (``_classes-{split}.npy``, atomically) and a wids descriptor, and
    return the split's ``_info.json`` entries (``class_index``, ``mean``, ``std``). Memory: one image at a time."""
    from distillset.core.data import ChannelMoments, decode_sample, read_tar_samples
    from distillset.core.io import atomic_path, write_json

    urls = shards.urls(split)
    labels, lengths = [], []
    moments = ChannelMoments()
    for url in urls:
        n = 0
        for sample in read_tar_samples(url):
            image, label = decode_sample(sample, len(shards.class_names))
            moments.add(image[None])
            labels.append(label)
            n += 1
        lengths.append(n)
    if not labels:
        raise DistillError(f"shards in {shards.folder} hold no '{split}' samples.")
    folder = Path(shards.folder)
    with atomic_path(folder / index_name(split)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(labels, dtype=np.int32))
    names = [Path(u).name for u in urls]
    write_json(folder / f"{split}.wids.json", {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"{folder.name}-{split}",
        "shardlist": [{"url": u, "nsamples": n} for u, n in zip(names, lengths)]})
    mean, std = moments.result()
    log.info("class index: %s %s (%d samples, %d shards)", folder, split, len(labels), len(urls))
    return {"class_index": index_name(split), "index_format": INDEX_FORMAT, "shard_lengths": lengths,
            "num_samples": len(labels), "mean": mean, "std": std}
