"""Shared test fixtures. Real data lives in ../shared/data beside the project; tests that need
it skip with a clear reason where it is absent (a user's machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No hub access on these machines: anything that tries must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("EMBSUM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GOODREADS = SHARED_DATA / "goodreads"
MIND_SAMPLE = SHARED_DATA / "mind-sample"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data is only beside the project in CI/dev)")
    return path


@pytest.fixture(scope="session")
def goodreads_dir() -> Path:
    return _need(GOODREADS)


@pytest.fixture(scope="session")
def mind_dir() -> Path:
    return _need(MIND_SAMPLE)


@pytest.fixture
def db_file(tmp_path) -> Path:
    return tmp_path / "catalog.duckdb"


@pytest.fixture
def killed_after_save(monkeypatch):
    """`killed_after_save(fit, step)`: run `fit()` as if the process died right after the
    training loop saved OUT/last at `step` (KeyboardInterrupt), then restore the real save."""
    from embsum.training.loop import TrainingLoop

    real_save = TrainingLoop.save_last

    def run(fit, step: int) -> None:
        def save_then_die(loop):
            digest = real_save(loop)
            if loop.step == step:
                raise KeyboardInterrupt
            return digest

        monkeypatch.setattr(TrainingLoop, "save_last", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                fit()
        finally:
            monkeypatch.setattr(TrainingLoop, "save_last", real_save)

    return run
