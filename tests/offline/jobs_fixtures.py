"""Fixtures and helpers for the precompute / index / refresh / score tests: a tiny EmbSum
checkpoint built from a config (no downloads, seconds on a CPU) and a small synthetic catalog.
Import the fixtures into a test module: `from jobs_fixtures import tiny_checkpoint, ...`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["space", "ship", "crew", "mystery", "murder", "detective", "love", "story", "war", "history",
         "dragon", "magic", "school", "kingdom", "science", "future", "robot", "city", "family", "secret",
         "ocean", "island", "music", "art"]


def item_rows(ids, seed: int = 0, tag: str = "") -> pa.Table:
    """Items with varied text lengths (so length sorting and padding matter)."""
    rng = np.random.default_rng(seed)
    titles, descriptions = [], []
    for k, _ in enumerate(ids):
        words = rng.choice(WORDS, size=3 + (k * 7) % 17)
        titles.append(f"{tag}{' '.join(words[:3]).title()}")
        descriptions.append(" ".join(words) + ".")
    return pa.table({"item_id": list(ids), "title": titles, "description": descriptions})


def write_items_tsv(path: Path, table: pa.Table) -> Path:
    lines = ["item_id\ttitle\tdescription"]
    lines += ["\t".join(r) for r in zip(*(table[c].to_pylist() for c in ("item_id", "title", "description")))]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_catalog(db: Path, n_items: int = 48, n_users: int = 16, seed: int = 0) -> None:
    from embsum.index.catalog import Catalog

    rng = np.random.default_rng(seed)
    ids = [f"b{k:03d}" for k in range(n_items)]
    rows = []
    for u in range(n_users):
        hist = rng.choice(ids, size=1 + u % 5, replace=False)
        rows += [(f"u{u:02d}", item, pos) for pos, item in enumerate(hist)]
    with Catalog(db) as cat:
        cat.upsert_items(item_rows(ids, seed))
        cat.upsert_interactions(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                          "position": pa.array([r[2] for r in rows], pa.int32())}))


def tiny_backbone(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT (1 layer, d=32) with the packaged tokenizer, saved as a backbone folder."""
    import torch
    from transformers import BertConfig, BertModel

    from embsum.model.backbone import load_tokenizer, packaged_dir

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(directory))
    load_tokenizer(packaged_dir()).save_pretrained(str(directory))
    return directory


def make_checkpoint(directory: Path, seed: int = 0) -> str:
    """A tiny BERT (1 layer, d=32) warm-started into EmbSum with n=3 item and m=2 user codes."""
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import build_model, save_checkpoint

    backbone = tiny_backbone(directory.parent / f"{directory.name}-backbone", seed)
    config = ModelConfig(backbone=str(backbone), item_codes=3, user_codes=2, item_max_tokens=32)
    return save_checkpoint(build_model(config, seed=seed), directory)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt2") / "tiny-other"
    make_checkpoint(path, seed=1)
    return path


@pytest.fixture
def catalog(tmp_path) -> Path:
    db = tmp_path / "cat.duckdb"
    build_catalog(db)
    return db


def cli(*args, ok: bool = True):
    """Run the CLI in-process; assert success unless ok=False."""
    from click.testing import CliRunner
    from embsum.offline.cli import cli as group

    result = CliRunner().invoke(group, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def cli_subprocess(*args, kill_at: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the CLI in a child process (optionally SIGKILLed at a failpoint)."""
    env = {**os.environ, "EMBSUM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("EMBSUM_KILL_AT", None)
    if kill_at:
        env["EMBSUM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "embsum.offline.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def copy_state(src: Path, dst: Path) -> Path:
    """Copy a test folder (catalog + index) so each scenario starts from the same state."""
    shutil.copytree(src, dst)
    return dst


def embeddings_state(db: Path, model_hash: str) -> dict:
    """Every stored vector row (stale ones too) by kind: id -> (hash, vectors)."""
    from embsum.index import embeddings as E
    from embsum.index.catalog import Catalog

    out = {}
    with Catalog(db, read_only=True) as cat:
        for kind in (E.ITEM, E.USER):
            block = E.read(cat, model_hash, kind, current=False)
            out[kind] = {} if block is None else {
                i: (h, *[block.vectors[c][k] for c in sorted(block.vectors)])
                for k, (i, h) in enumerate(zip(block.ids, block.hashes))}
    return out


def assert_same_embeddings(a: dict, b: dict) -> None:
    for kind, rows in a.items():
        assert sorted(rows) == sorted(b[kind]), kind
        for key, (h, *vecs) in rows.items():
            h2, *vecs2 = b[kind][key]
            assert h == h2
            for x, y in zip(vecs, vecs2):
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def assert_same_index(root_a: Path, root_b: Path, model_hash: str) -> None:
    from embsum.index import faiss_index as F
    from embsum.index import snapshot as S

    a, b = F.by_item(S.load(root_a, model_hash)), F.by_item(S.load(root_b, model_hash))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0] == b[k][0]
        np.testing.assert_allclose(a[k][1], b[k][1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a[k][2], b[k][2], rtol=0, atol=1e-6)
