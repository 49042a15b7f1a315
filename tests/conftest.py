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
