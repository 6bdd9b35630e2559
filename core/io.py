"""Crash-safe file IO: every artefact is written to a temporary name in the same folder and renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distillset.core.errors import DistillError

# the temporary names atomic_path gives: ".NAME.XXXXXXXX.tmp" (mkstemp's 8 random characters)
TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def is_temp(name: str) -> bool:
    """Whether ``name`` is the temporary name of one of distillset's own atomic writes (left by a killed run)."""
    return bool(TEMP_RE.match(name))


def clean_temp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files killed writes left anywhere under ``folder``; returns what was removed.

    Only call this where no other process writes into ``folder`` (concurrent runs into one folder are not supported).
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.rglob(".*.tmp")):
        if is_temp(p.name) and (p.is_file() or p.is_symlink()):
            p.unlink()
            removed.append(p)
    return removed


def inside(folder: str | os.PathLike, name: str | os.PathLike, what: str, must_exist: bool = False) -> Path:
    """The file ``name`` (read from a file in ``folder``: a manifest, prior.json, _info.json, labels.json, ...)
    resolved inside ``folder``; a name that leaves it is an error.

    A name is relative to ``folder``. ``..`` that climbs out, an absolute path outside the folder and a symbolic
    link resolving outside it are refused; an absolute path that points inside the folder (older manifests stored
    some names that way) is accepted as that name.

    Args:
        folder: the folder the describing file lives in.
        name: the name as read from the file.
        what: what the name is for, e.g. ``"manifest.json 'zca'"`` (used in the error message).
        must_exist: also require a file of that name.

    Returns:
        The resolved path.
    """
    folder = Path(folder)
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise DistillError(f"{what} in {folder} is {name!r}, not a file name; the file describing {folder} is "
                           "damaged or crafted: re-create it with the stage that writes it.")
    root = folder.resolve()
    raw = Path(name)
    target = (raw if raw.is_absolute() else root / raw).resolve()
    if target != root and root not in target.parents:
        raise DistillError(f"{what} names '{name}', which is outside {folder}; a folder may only refer to files "
                           "inside it (the file is damaged or crafted: re-create it with the stage that writes it).")
    if must_exist and not target.is_file():
        raise DistillError(f"{what} names '{name}', which is not a file in {folder}; re-run the stage that wrote "
                           f"{folder} to write it again.")
    return target


_HASHES: dict[tuple[str, int, int], str] = {}
# files that identify a model, a prior, statistics or experts (logs, CSVs and YAML copies of a config are not read)
CONTENT_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".msgpack")


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of what a file or folder holds, so an input is identified by its content and not by its path.

    A file hashes its bytes; a folder hashes the relative names and hashes of its weight and metadata files
    (:data:`CONTENT_SUFFIXES`, recursively, hidden and temporary files skipped). Each file's hash is cached by
    (path, size, mtime) within the process, so checking the inputs of a resumed run again is cheap.
    """
    path = Path(path)
    if path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = file_sha256(path)
        return _HASHES[key]
    if not path.is_dir():
        raise DistillError(f"{path} does not exist; check the path.")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.suffix not in CONTENT_SUFFIXES:
            continue
        h.update(f"{rel.as_posix()}\0{content_sha256(p)}\n".encode())
    return h.hexdigest()


def umask() -> int:
    """The process's file-mode creation mask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_folder(final: Path) -> Path:
    """A new temporary folder beside ``final`` (renamed onto it when complete), with the permissions the umask
    gives a folder (``mkdtemp`` alone makes it 0700: other users, containers and clusters could not read it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


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
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; artefacts get the mode any tool would give them
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str] | None = None,
              floats: str | None = None) -> None:
    """Rows of dicts as a CSV file, written atomically. ``fields``: the columns (default: every key, in first-seen
    order; keys outside ``fields`` are left out); ``floats``: a format spec for float cells (e.g. ``".4f"``). No
    rows and no fields: an empty file."""
    import csv
    import io

    cols = fields if fields is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    if cols:
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (format(v, floats) if floats and isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


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


def finished_record(path: str | os.PathLike, fingerprint: str, what: str, differ=None) -> dict | None:
    """The JSON record a finished run left at ``path`` (``None`` if there is none). A record written by a run with
    another config fingerprint is refused, so a re-run never mixes two runs' outputs in one folder; ``differ(record)``
    (e.g. :func:`core.config.config_diff` against this run's config) says which fields differ."""
    path = Path(path)
    if not path.exists():
        return None
    done = read_json(path)
    if done.get("fingerprint") != fingerprint:
        diff = differ(done) if differ is not None else ""
        raise DistillError(f"{path.parent} holds {what} trained with another config{f' ({diff})' if diff else ''}; "
                           "choose another --out for this one, or delete that folder to replace it.")
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
