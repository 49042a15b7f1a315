"""Job locks beside the catalog, and who holds them.

DuckDB lets one process at a time open a catalog file for writing, and while any process has it
open (even read-only) no other can open it for writing. So long jobs hold the file only for short
moments (reading their work list, committing a chunk; see index/catalog.py) and take turns among
themselves with a lock of their own:

- `JobLock(db, kind)`: at most one writer job (precompute, ingest, summarize, ...) per catalog.
  A second one waits up to its `--wait`, saying for whom, then gives up with `CatalogBusy`.
- `exclusive(path, what)`: the same kind of lock that never waits (one refresh at a time: a
  nightly job that finds last night's still running should say so, not queue behind it).

Both are `fcntl.flock` on a small file beside the catalog (`<db>.job.lock`,
`<db>.refresh.lock`). The kernel drops the lock when the holder exits, however it exits (SIGKILL
included), so a crashed job never leaves a stale lock. The file also records the holder (pid,
host, job kind, run id, start) as one JSON line, so a job that must wait, or a reader that finds
the catalog busy, can name it; once the lock is free the file only says who held it last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import CatalogBusy, StorageError

log = logging.getLogger("embsum.lock")

POLL_S = 0.2  # how often a waiting job tries the lock again


class LockHeld(StorageError):
    """Another process holds the lock (one clear line for the user)."""


def lock_path(db_path: str | Path, what: str = "refresh") -> Path:
    db_path = Path(db_path)
    return db_path.with_name(f"{db_path.name}.{what}.lock")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what a waiting job tells its user."""

    pid: int
    kind: str
    started: str  # ISO time, local
    host: str = ""
    run_id: str | None = None

    @classmethod
    def me(cls, kind: str) -> Holder:
        return cls(os.getpid(), kind, dt.datetime.now().isoformat(timespec="seconds"), socket.gethostname())

    def describe(self) -> str:
        what = f"{self.kind} run {self.run_id}" if self.run_id else self.kind
        try:
            since = dt.datetime.fromisoformat(self.started).strftime("%H:%M")
        except ValueError:
            since = self.started
        host = "" if self.host in ("", socket.gethostname()) else f" on {self.host}"
        return f"{what} (pid {self.pid}{host}, started {since})"


def read_holder(path: str | Path) -> Holder | None:
    """The holder a lock file records (the last one, if the lock is free now); None when the file
    is missing, empty or being rewritten at this instant."""
    try:
        fields = json.loads(Path(path).read_text())
        return Holder(**{k: fields[k] for k in ("pid", "kind", "started", "host", "run_id") if k in fields})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _try_flock(path: Path) -> int | None:
    """An open descriptor holding the exclusive lock on `path`, or None if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _record(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)


def current_holder(path: str | Path) -> Holder | None:
    """Who holds the lock file `path` right now; None when nobody does."""
    path = Path(path)
    if not path.exists():
        return None
    fd = _try_flock(path)
    if fd is not None:  # free: what the file says is history
        os.close(fd)
        return None
    return read_holder(path) or Holder(0, "another job", "?")


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "refresh") -> Iterator[Path]:
    """Hold the lock for the block, or raise LockHeld at once (never wait)."""
    path = Path(path)
    fd = _try_flock(path)
    if fd is None:
        holder = read_holder(path)
        raise LockHeld(f"another {what} is already running ({holder.describe() if holder else 'unknown process'});"
                       f" lock file {path}")
    try:
        _record(fd, Holder.me(what))
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# lock file -> [descriptor, depth, holder] of the job locks this process holds: a command that
# opens the catalog twice (or a helper inside a job) must not wait for itself.
_HELD: dict[str, list] = {}


class JobLock:
    """At most one writer job per catalog. `acquire()` waits up to `wait_s` seconds for the
    running one, logging once whom it waits for, then raises CatalogBusy naming it."""

    def __init__(self, db_path: str | Path, kind: str):
        self.db_path = str(db_path)
        self.path = lock_path(db_path, "job")
        self.kind = kind
        self._key = os.path.realpath(self.path)
        self._mine = False

    def acquire(self, wait_s: float = 0.0, on_wait: Callable[[Holder], None] | None = None) -> JobLock:
        if self._mine:
            return self
        held = _HELD.get(self._key)
        if held is not None:  # this process already runs a job on this catalog
            held[1] += 1
            self._mine = True
            return self
        deadline = time.monotonic() + wait_s
        told = False
        while (fd := _try_flock(self.path)) is None:
            holder = current_holder(self.path)  # None: it was released just now; try again
            if holder is not None and time.monotonic() >= deadline:
                raise CatalogBusy(f"catalog {self.db_path} is busy: {holder.describe()} is writing it;"
                                  f" gave up after waiting {wait_s:g} s (--wait SECONDS to wait longer)")
            if holder is not None and not told:
                (on_wait or _log_wait)(holder)
                told = True
            time.sleep(POLL_S)
        holder = Holder.me(self.kind)
        _record(fd, holder)
        _HELD[self._key] = [fd, 1, holder]
        self._mine = True
        return self

    def note_run(self, run_id: str) -> None:
        """Record the job's run id (known once its `runs` row exists) for whoever waits."""
        held = _HELD.get(self._key)
        if self._mine and held is not None and held[2].run_id is None:
            held[2] = replace(held[2], run_id=run_id)
            _record(held[0], held[2])

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            os.close(held[0])  # closing the descriptor releases the flock


def _log_wait(holder: Holder) -> None:
    log.warning("waiting for %s to finish with the catalog ...", holder.describe())


def busy_holder(db_path: str | Path) -> Holder | None:
    """The writer job running on this catalog, if any (what a busy reader names)."""
    return current_holder(lock_path(db_path, "job"))
