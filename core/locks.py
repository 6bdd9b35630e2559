"""Advisory file locks, so several runs (or ranks) writing one output folder share its work instead of repeating it.

A lock is a POSIX record lock (``fcntl.lockf``) on a small file that names its holder (pid, host, time) for humans.
The kernel drops the lock when its process dies, however it dies, so a lock left by a killed run is never "stale": the
next run simply takes it (and resumes that unit from its checkpoint). Record locks also work on NFS, where runs on
several machines share one folder.

* :func:`try_lock` takes a lock without waiting (``None`` if someone holds it): one per work unit.
* :func:`hold` waits for a lock (shared or exclusive): a run holds ``run.lock`` shared while it runs, and only a run
  that can take it exclusively (no other run is active) cleans the temporary files killed writes left behind;
  ``with hold(path):`` is a critical section across processes (a manifest's read-modify-write).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path


class Lock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def downgrade(self) -> None:
        """Turn an exclusive lock into a shared one, atomically (no other process can take it in between)."""
        fcntl.lockf(self.fd, fcntl.LOCK_SH)

    def release(self, remove: bool = False) -> None:
        if self.fd < 0:
            return
        if remove:  # unlink while still holding it: a process that opened the old file finds the work done
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner(path: str | os.PathLike) -> str:
    """Who holds (or last held) the lock at ``path``, for messages: ``pid N on HOST since T``."""
    try:
        d = json.loads(Path(path).read_text() or "{}")
        return f"pid {d.get('pid')} on {d.get('host')} since {time.strftime('%H:%M:%S', time.localtime(d['time']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _stamp(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode(), 0)


def try_lock(path: str | os.PathLike) -> Lock | None:
    """Take the exclusive lock at ``path`` if nobody holds it (no waiting); ``None`` when another process does."""
    path = Path(path)
    fd = _open(path)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    _stamp(fd)
    return Lock(path, fd)


def hold(path: str | os.PathLike, shared: bool = False, wait: bool = True) -> Lock | None:
    """Take the lock at ``path``, shared or exclusive, waiting for it unless ``wait`` is false (then ``None`` when
    it is taken)."""
    path = Path(path)
    fd = _open(path)
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.lockf(fd, flags)
    except OSError:
        os.close(fd)
        return None
    if not shared:
        _stamp(fd)
    return Lock(path, fd)
