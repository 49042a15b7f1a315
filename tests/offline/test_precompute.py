"""embsum precompute: stored vectors equal the model's forward pass; skip/resume; dedupe;
checkpoints never mix; dtypes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from embsum.offline.texts import item_text
from jobs_fixtures import cli

# Precompute-then-score vs a per-pair forward pass (batch of one, no padding): float32 rounding
# differs between padded batches and single sequences, nothing else.
SCORE_ATOL = 1e-5


def _hash(ckpt):
    from embsum.model.checkpoint import checkpoint_hash

    return checkpoint_hash(ckpt)


def test_scores_from_stored_vectors_equal_forward_pass(catalog, tiny_checkpoint, tmp_path):
    import torch

    from embsum.inference.encoding import user_sessions
    from embsum.model.checkpoint import load_checkpoint
    from embsum.model.scoring import poly_score

    # fp32, as the forward pass below ('auto' runs bf16 on an AVX512-BF16 or AMX CPU)
    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint, "--chunk-size", 10, "--batch-size", 4,
        "--dtype", "fp32")
    with Catalog(catalog) as cat:
        histories = cat.histories()
        items = cat.items()
    text = dict(zip(items["item_id"].to_pylist(),
                    [item_text(t, d) for t, d in zip(items["title"].to_pylist(), items["description"].to_pylist())]))
    rng = np.random.default_rng(0)
    users = sorted(histories)[:6]
    pairs = [(u, i) for u in users for i in rng.choice(sorted(text), 5, replace=False)]
    cand = tmp_path / "pairs.tsv"
    cand.write_text("user_id\titem_id\n" + "".join(f"{u}\t{i}\n" for u, i in pairs))
    out = tmp_path / "scores.parquet"
    cli("--db", catalog, "score", "--checkpoint", tiny_checkpoint, "--candidates", cand, "--top", 0, "--out", out)
    got = {(u, i): s for u, i, s in zip(*(pq.read_table(out)[c].to_pylist() for c in ("user_id", "item_id", "score")))}
    assert len(got) == len(pairs)

    model, _ = load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        for u, i in pairs:
            tok = model.tokenize([text[i]])
            cpe, cpe_prime = model.encode_items(tok["input_ids"], tok["attention_mask"])
            sessions = user_sessions(model, [text[h] for h in histories[u]])
            stok = model.tokenize(sessions)
            upe = model.encode_users(stok["input_ids"], stok["attention_mask"], torch.arange(len(sessions))[None])
            expected = float(poly_score(upe, cpe, cpe_prime)[0])
            assert got[(u, i)] == pytest.approx(expected, abs=SCORE_ATOL), (u, i)


def test_rerun_skips_everything_and_edits_reencode_only_changed(catalog, tiny_checkpoint):
    first = cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 48" in first and "users_encoded 16" in first
    again = cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 0" in again and "items_skipped 48" in again and "users_encoded 0" in again
    with Catalog(catalog) as cat:
        cat.upsert_items(pa.table({"item_id": ["b001", "b002"], "title": ["New title", "Other"],
                                   "description": ["changed", "changed too"]}))
        runs = cat.runs("precompute")
    assert runs.num_rows == 2 and set(runs["status"].to_pylist()) == {"ok"}
    third = cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint, "--no-users").output
    assert "items_encoded 2" in third


def test_identical_texts_encoded_once(tmp_path, tiny_checkpoint):
    db = tmp_path / "dup.duckdb"
    with Catalog(db) as cat:
        cat.upsert_items(pa.table({"item_id": ["a", "b", "c"], "title": ["Same", "Same", "Other"],
                                   "description": ["text", "text", "text"]}))
    out = cli("--db", db, "precompute", "--checkpoint", tiny_checkpoint, "--no-users").output
    assert "items_encoded 3" in out and "item_texts_encoded 2" in out
    with Catalog(db, read_only=True) as cat:
        block = E.read(cat, _hash(tiny_checkpoint), E.ITEM)
    np.testing.assert_array_equal(block.vectors["cpe"][0], block.vectors["cpe"][1])


def test_checkpoints_never_mix(catalog, tiny_checkpoint, other_checkpoint):
    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint, "--no-users")
    out = cli("--db", catalog, "precompute", "--checkpoint", other_checkpoint, "--no-users").output
    assert "items_encoded 48" in out  # nothing reused from the other checkpoint
    with Catalog(catalog, read_only=True) as cat:
        a = E.read(cat, _hash(tiny_checkpoint), E.ITEM)
        b = E.read(cat, _hash(other_checkpoint), E.ITEM)
    assert a.ids == b.ids and not np.allclose(a.vectors["cpe"], b.vectors["cpe"], atol=1e-6)
    # two models in the catalog: index/score must be told which
    result = cli("--db", catalog, "index", ok=False)
    assert result.exit_code == 1 and "choose one with --checkpoint" in result.output


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_reduced_precision_stays_close_to_fp32(tmp_path, catalog, tiny_checkpoint, dtype):
    import shutil

    other = tmp_path / "copy.duckdb"
    shutil.copy(catalog, other)
    cli("--db", catalog, "precompute", "--checkpoint", tiny_checkpoint, "--no-users")
    cli("--db", other, "precompute", "--checkpoint", tiny_checkpoint, "--no-users", "--dtype", dtype)
    h = _hash(tiny_checkpoint)
    with Catalog(catalog, read_only=True) as a, Catalog(other, read_only=True) as b:
        x, y = E.read(a, h, E.ITEM).vectors["cpe"], E.read(b, h, E.ITEM).vectors["cpe"]
        assert set(b.arrow(f"SELECT DISTINCT dtype FROM {E.space(b, h, E.ITEM).table}")["dtype"].to_pylist()) == {dtype}
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert cos.mean() > 0.9


def test_bad_checkpoint_is_one_clear_line(catalog, tmp_path):
    result = cli("--db", catalog, "precompute", "--checkpoint", tmp_path / "nope", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in result.output
    with Catalog(catalog, read_only=True) as cat:  # the run was opened before the model load
        runs = cat.runs("precompute").to_pylist()
    assert [r["status"] for r in runs] == ["failed"] and "does not exist" in runs[0]["error"]


def test_invalid_options_are_usage_errors(catalog, tmp_path):
    result = cli("--db", catalog, "precompute", "--checkpoint", tmp_path, "--batch-size", 0, ok=False)
    assert result.exit_code == 2 and "chunk_size and batch_size must be >= 1" in result.output
    result = cli("--db", catalog, "precompute", "--checkpoint", tmp_path, "--dtype", "int8", "--device", "cuda",
                 ok=False)
    assert result.exit_code == 2 and "CPU only" in result.output


def test_encode_ahead_writes_in_order_and_stops_at_a_failed_encode():
    """Chunk k+1 encodes on the worker while chunk k is written: writes must still come in
    job order, each with its own result, and an encode error must surface before any later
    chunk is written (the committed prefix is what a resumed run skips)."""
    import threading

    from embsum.offline.precompute import encode_ahead

    written, threads = [], set()

    def encode(job):
        threads.add(threading.current_thread().name)
        if job == 3:
            raise ValueError("bad chunk")
        return job * 10

    def write(job, result):
        written.append((job, result))

    encode_ahead(range(3), encode, write)
    assert written == [(0, 0), (1, 10), (2, 20)]
    assert all(name.startswith("embsum-encode") for name in threads)
    written.clear()
    with pytest.raises(ValueError, match="bad chunk"):
        encode_ahead(range(6), encode, write)
    assert written == [(0, 0), (1, 10), (2, 20)]
    encode_ahead([], encode, write)
    assert written == [(0, 0), (1, 10), (2, 20)]


def test_scattered_edits_encode_as_one_chunk(catalog, tiny_checkpoint, monkeypatch):
    """A nightly run's few edits, spread over many catalog pages, are encoded together: one
    length-sorted chunk, not one small batch per page."""
    from embsum.offline import precompute as P
    from embsum.offline.job_configs import PrecomputeConfig

    from embsum.model.checkpoint import load_checkpoint

    model, digest = load_checkpoint(tiny_checkpoint)
    cfg = PrecomputeConfig(chunk_size=8, users=False)
    calls = []
    encode = P.encode_items
    monkeypatch.setattr(P, "encode_items",
                        lambda m, texts, c, *rest: calls.append(len(texts)) or encode(m, texts, c, *rest))
    with Catalog(catalog) as cat:
        assert P.precompute_items(cat, model, digest, cfg)["items_encoded"] == 48
        assert calls == [8] * 6
        edited = cat.items().column("item_id").to_pylist()[::9]  # one per id page of 8, and more
        cat.upsert_items(pa.table({"item_id": edited, "title": ["Edited"] * len(edited),
                                   "description": [f"new {i}" for i in edited]}))
        calls.clear()
        counts = P.precompute_items(cat, model, digest, cfg)
    assert counts["items_encoded"] == len(edited) == 6 and calls == [6]


def test_encode_ahead_reads_nothing_more_after_a_stop_request():
    """A stop asked for while chunk 1 is written: chunk 2 (already encoding) is still written
    with what its encode finished, and no chunk after it is read."""
    import threading

    from embsum.offline.precompute import encode_ahead

    stop, read, written = threading.Event(), [], []

    def jobs():
        for k in range(10):
            read.append(k)
            yield k

    def write(job, result):
        written.append((job, result))
        if job == 1:
            stop.set()

    encode_ahead(jobs(), lambda job: job * 10, write, stop)
    assert written == [(0, 0), (1, 10), (2, 20)] and read == [0, 1, 2]


def test_stopped_encode_returns_whole_leading_rows(tiny_checkpoint):
    """A stop after the first batch of distinct texts: the rows finished are the leading rows
    whose texts are all encoded (a repeated text counts once), with the vectors a whole run gives."""
    import threading

    from embsum.offline.job_configs import PrecomputeConfig
    from embsum.offline.precompute import encode_items

    from embsum.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    cfg = PrecomputeConfig(batch_size=2)
    texts = ["a story of ships", "the dragon school", "a story of ships", "robots", "war", "the dragon school", "art"]
    whole = encode_items(model, texts, cfg)
    assert whole.rows == len(texts)
    stop, seen = threading.Event(), []
    part = encode_items(model, texts, cfg, stop, on_rows=lambda n: seen.append(n) or stop.set())
    assert part.rows == 3 and seen == [3]  # 2 distinct texts done: rows 0-2; row 3 needs a third
    for got, full in zip(part.vectors, whole.vectors):
        assert got.shape[0] == 3
        np.testing.assert_allclose(got, full[:3], rtol=0, atol=1e-6)
