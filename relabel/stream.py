"""Bounded-memory IO for relabelling: distilled images streamed in chunks, safetensors files written piecewise.

Relabel memory must not grow with the number of distilled images: images are decoded from the shards a chunk at a
time (in the order :func:`distillset.core.distilled.load_distilled` gives them) and each epoch block's labels go
straight to their place in the output file, whose size is known in advance.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from distillset.core.data import decode_sample, read_tar_samples
from distillset.core.distilled import (
    SHARD_ADVICE,
    check_shard_keys,
    check_total,
    distilled_shards,
    num_images,
    read_manifest,
    shard_keys,
)
from distillset.core.errors import DistillError
from distillset.core.io import atomic_path

log = logging.getLogger("distillset.relabel")

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8", torch.int16: "I16", torch.int64: "I64"}


def _shard_groups(folder: Path, manifest: dict) -> list[list[Path]]:
    """Shards grouped so that sorted keys never interleave across groups (one group per class block of units).

    The groups come from the manifest's unit list (the writer's layout; nothing is recomputed here): a class
    block's shards are merged by key, consecutive class blocks follow each other. A folder written before the unit
    list was recorded has all its shards in one merged group.
    """
    shards = distilled_shards(folder, manifest)
    for path, unit in shards:
        keys = shard_keys(path)
        check_shard_keys(path, unit, keys)
    if any(unit is None for _, unit in shards):
        check_total(folder, manifest, sum(len(shard_keys(p)) for p, _ in shards))
        return [[p for p, _ in shards]]
    groups: dict[tuple[int, int], list[Path]] = {}
    for path, unit in shards:
        groups.setdefault(tuple(unit["classes"]), []).append(path)
    return [groups[k] for k in sorted(groups)]


def iter_distilled(folder: str | Path, chunk: int, require_complete: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)`` chunks of at most ``chunk`` uint8 images (n, C, H, W) in ``load_distilled`` order.

    At most one decoded sample per open shard of a class block plus one chunk are held at a time.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if require_complete and manifest.get("status") != "complete":
        raise DistillError(f"{folder} is an unfinished run (status {manifest.get('status')}); re-run the same "
                           "recover command to finish it.")
    num_classes = len(manifest["class_names"])
    groups = _shard_groups(folder, manifest)
    unsorted = next((s for g in groups for s in g if not _keys_sorted(s)), None)
    if unsorted is not None:  # not written by recover: merging needs key-sorted shards, so load them all instead
        from distillset.core.distilled import load_distilled

        log.warning("shard %s is not in key order; all %s images are held in memory (write shards with keys "
                    "sorted to stream them)", unsorted, folder)
        images = load_distilled(folder, require_complete)[0].images
        for s in range(0, len(images), chunk):
            yield s, images[s:s + chunk]
        return
    buf: list[torch.Tensor] = []
    start = 0
    for group in groups:
        streams = [read_tar_samples(str(s), advice=SHARD_ADVICE) for s in group]
        for sample in heapq.merge(*streams, key=lambda s: s["__key__"]):
            buf.append(decode_sample(sample, num_classes)[0])
            if len(buf) == chunk:
                yield start, torch.stack(buf)
                start += len(buf)
                buf = []
    if buf:
        yield start, torch.stack(buf)


def _keys_sorted(shard: Path) -> bool:
    """Whether a shard's sample keys increase (member headers only; nothing is decoded)."""
    keys = shard_keys(shard)
    return all(a <= b for a, b in zip(keys, keys[1:]))


def count_images(folder: str | Path) -> int:
    """Number of images of a distilled set: what its shards hold (member headers only), checked against the
    manifest, so a number in the manifest never sizes a label file on its own."""
    return num_images(folder)


class TensorFileWriter:
    """Writes a safetensors file whose tensors' shapes are known up front, region by region, atomically.

    The header is written first, then slices along the first two dims land at their offsets (seek + write), so no
    tensor of the file is ever held whole. The file appears at ``path`` only when :meth:`close` succeeds.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
        self.specs, self.offsets = specs, {}
        pos = 0
        for name in sorted(specs):
            shape, dtype = specs[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name] = pos
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._file = open(tmp, "wb")  # noqa: SIM115  (stays open across write() calls; closed in close/abort)
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._base = 8 + len(raw)
        self._file.truncate(self._base + pos)

    def write(self, name: str, i: int, j: int, values: torch.Tensor) -> None:
        """Store ``values`` as ``tensor[i, j : j + len(values)]`` (a contiguous run of the row-major layout)."""
        shape, dtype = self.specs[name]
        if values.dtype != dtype or tuple(values.shape[1:]) != tuple(shape[2:]):
            raise ValueError(f"{name}: got {tuple(values.shape)} {values.dtype}, file holds {shape} {dtype}")
        row = int(np.prod(shape[2:], dtype=np.int64)) * values.element_size()
        self._file.seek(self._base + self.offsets[name] + (i * shape[1] + j) * row)
        self._file.write(values.contiguous().cpu().numpy().tobytes())

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def tensor_file_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{name: (shape, bytes)}`` of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()
            if k != "__metadata__"}
