"""Named points where a test can kill, signal or slow down the running process.

- `EMBSUM_KILL_AT="name"` SIGKILLs at the first time `hit("name")` runs; `"name:3"` at the
  third. A real SIGKILL, not an exception: no `finally`, no atexit, no DuckDB rollback runs,
  exactly as when the kernel's OOM killer strikes (crash-safety tests).
- `EMBSUM_SIGNAL_AT="name:3:INT"` sends the process SIGINT (or TERM) at the third hit, from
  wherever the point is (a worker thread too): a Ctrl-C or `kill` at a known moment
  (graceful-stop tests).
- `EMBSUM_DELAY_AT="name:0.5"` sleeps 0.5 s at every hit: a job slow enough for another process
  to act while it runs (locking tests).
Unset (always, outside tests) a hit is three dict lookups.
"""

from __future__ import annotations

import os
import signal
import time

_seen: dict[str, int] = {}


def hit(name: str) -> None:
    kill, sig, delay = (os.environ.get(k) for k in ("EMBSUM_KILL_AT", "EMBSUM_SIGNAL_AT", "EMBSUM_DELAY_AT"))
    if not (kill or sig or delay):
        return
    if kill and _nth_hit(kill, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if sig:
        target, _, rest = sig.partition(":")
        nth, _, which = rest.partition(":")
        if _nth_hit(f"{target}:{nth}", name, key="signal"):
            os.kill(os.getpid(), getattr(signal, f"SIG{which or 'INT'}"))
    if delay:  # after a signal: its handler (main thread) runs while this thread sleeps
        target, _, seconds = delay.partition(":")
        if target == name:
            time.sleep(float(seconds or 1))


def _nth_hit(spec: str, name: str, key: str = "kill") -> bool:
    """Whether this hit of `name` is the one `spec` ("name" or "name:N") asks for."""
    target, _, nth = spec.partition(":")
    if target != name:
        return False
    counter = f"{key}:{name}"
    _seen[counter] = _seen.get(counter, 0) + 1
    return _seen[counter] == int(nth or 1)
