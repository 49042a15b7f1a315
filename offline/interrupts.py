"""Graceful stop for long jobs: Ctrl-C or SIGTERM asks the job to stop after its current batch.

Inside `with graceful_stop("precompute") as stop:` the first SIGINT/SIGTERM only sets `stop` (a
`threading.Event`); the job checks it between batches (its worker threads too), commits what
is finished, records its run as 'interrupted' and raises `embsum.offline.errors.Interrupted` (exit
130); the re-run resumes. A second signal means "now": KeyboardInterrupt, as without this
(the batch in flight is lost, committed chunks stay). Outside the block, and in other threads
(where Python cannot install handlers), signals keep their previous handlers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("embsum")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def graceful_stop(job: str) -> Iterator[threading.Event]:
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s: %s received, stopping after the current batch and committing it"
                    " (again to abort at once)", job, signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
