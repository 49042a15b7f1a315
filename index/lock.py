"""A job lock: at most one refresh per catalog at a time.

`fcntl.flock` on a lock file beside the catalog. The kernel drops the lock when the holder
exits, however it exits (SIGKILL included), so a crashed refresh never leaves a stale lock; the
file itself stays and only says who held it last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from index.errors import StorageError


class LockHeld(StorageError):
    """Another process holds the lock (one clear line for the user)."""


def lock_path(db_path: str | Path, what: str = "refresh") -> Path:
    db_path = Path(db_path)
    return db_path.with_name(f"{db_path.name}.{what}.lock")


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "refresh") -> Iterator[Path]:
    """Hold the lock for the block, or raise LockHeld at once (never wait: a nightly job that
    finds the previous night's still running should say so, not queue behind it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "unknown process"
            raise LockHeld(f"another {what} is already running ({holder}); lock file {path}") from None
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {stamp}".encode())
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
