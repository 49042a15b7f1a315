"""Named points where a test can SIGKILL the running process (crash-safety tests).

`EMBSUM_KILL_AT="name"` kills at the first time `hit("name")` runs; `"name:3"` at the third.
Unset (always, outside tests) a hit is one dict lookup. A real SIGKILL, not an exception: no
`finally`, no atexit, no DuckDB rollback runs, exactly as when the kernel's OOM killer strikes.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get("EMBSUM_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
