"""Crash-safe file IO: every artefact is written to a temporary name in the same folder and renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distillset.core.errors import DistillError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DistillError(f"{path} does not exist; check the path or run the stage that writes it first.") from None
    except json.JSONDecodeError as e:
        raise DistillError(f"{path} is not valid JSON ({e}); delete it and re-run the stage that writes it.") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Save tensors as safetensors atomically (contiguous, CPU; metadata must be str -> str)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise DistillError(f"{path} does not exist; check the path or run the stage that writes it first.")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise DistillError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated, "
                           "delete it and re-run the stage that writes it.") from None


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """SHA-256 of a file (the first ``limit`` bytes if given), used to identify teachers in manifests."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def finished_record(path: str | os.PathLike, fingerprint: str, what: str) -> dict | None:
    """The JSON record a finished run left at ``path`` (``None`` if there is none). A record written by a run with
    another config fingerprint is refused, so a re-run never mixes two runs' outputs in one folder."""
    path = Path(path)
    if not path.exists():
        return None
    done = read_json(path)
    if done.get("fingerprint") != fingerprint:
        raise DistillError(f"{path.parent} holds {what} trained with another config; choose another --out or delete "
                           "that folder.")
    return done


def require_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as an output folder: refused in one line when it names an existing file (or lies under one)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise DistillError(f"{flag} {path}: {p} is a file, not a folder; choose another {flag}.")
            break
    return path
