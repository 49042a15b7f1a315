"""Helpers for tests that run `embsum` jobs as child processes and act on them while they run
(test_locking.py, test_interrupt.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from jobs_fixtures import ROOT


def embsum_command() -> list[str]:
    """The installed console script of the interpreter running the tests (.venv/bin/embsum)."""
    script = Path(sys.executable).parent / "embsum"
    return [str(script)] if script.exists() else [sys.executable, "-m", "embsum.offline.cli"]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "EMBSUM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    for failpoint in ("EMBSUM_KILL_AT", "EMBSUM_SIGNAL_AT", "EMBSUM_DELAY_AT"):
        if failpoint not in extra:
            env.pop(failpoint, None)
    return env


def start_embsum(*args, **env: str) -> subprocess.Popen:
    """A child `embsum`; its output goes to temporary files (a full pipe would stall it)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 - finish() closes them
    proc = subprocess.Popen([*embsum_command(), *map(str, args)], cwd=ROOT, env=child_env(**env),
                            stdout=out, stderr=err, text=True)
    proc.output_files = (out, err)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a child started by `start_embsum`: (exit code, stdout, stderr)."""
    code = proc.wait(timeout=timeout)
    texts = []
    for stream in proc.output_files:
        stream.seek(0)
        texts.append(stream.read())
        stream.close()
    return code, texts[0], texts[1]


def run_embsum(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*embsum_command(), *map(str, args)], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def stored(db: Path, model_hash: str, kind: str = E.ITEM) -> int:
    """Vectors of `kind` committed so far (opened read-only; waits out the job's commits)."""
    with Catalog(db, read_only=True, wait_s=60) as cat:
        return E.count(cat, model_hash, kind)


def wait_until_encoding(proc: subprocess.Popen, db: Path, model_hash: str, timeout: float = 240) -> int:
    """Block until the job has committed its first chunk (it is then in its encode loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            code, _, err = finish(proc)
            raise AssertionError(f"precompute ended early ({code}): {err[-2000:]}")
        n = stored(db, model_hash)
        if n:
            return n
        time.sleep(0.2)
    raise AssertionError("precompute committed nothing in time")


def model_hash_of(ckpt) -> str:
    from embsum.model.checkpoint import checkpoint_hash

    return checkpoint_hash(ckpt)
