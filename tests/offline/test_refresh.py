"""embsum refresh: re-encodes exactly what changed, idempotent, one at a time, and a scoring
process keeps answering from the old index across the swap, then sees the new one."""

import json
import subprocess
import sys
import time

import pytest
from embsum.index import embeddings as E
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog
from embsum.index.lock import exclusive, lock_path
from jobs_fixtures import ROOT, cli, item_rows, write_items_tsv


def _hash(ckpt):
    from embsum.model.checkpoint import checkpoint_hash

    return checkpoint_hash(ckpt)


@pytest.fixture
def refreshed(catalog, tiny_checkpoint):
    out = cli("--db", catalog, "refresh", "--checkpoint", tiny_checkpoint, "--chunk-size", 16).output
    assert "items_encoded 48" in out and "index_action build" in out
    return catalog


def _changes(tmp_path, changed=10, new=5):
    """A nightly file: `changed` existing items with new text, `new` unseen items."""
    ids = [f"b{k:03d}" for k in range(0, 4 * changed, 4)] + [f"n{k:02d}" for k in range(new)]
    return write_items_tsv(tmp_path / "nightly.tsv", item_rows(ids, seed=7, tag="v2 "))


def test_ten_changed_five_new_reencodes_exactly_fifteen(refreshed, tiny_checkpoint, tmp_path):
    nightly = _changes(tmp_path)
    out = cli("--db", refreshed, "refresh", nightly, "--checkpoint", tiny_checkpoint, "--chunk-size", 16,
              "--index-max-drift", 0.5).output
    assert "items_encoded 15," in out and "items_skipped 38" in out
    assert "index_action update" in out and "index_added 5" in out and "index_replaced 10" in out
    snap = S.load(refreshed.with_suffix(".index"), _hash(tiny_checkpoint))
    content = F.by_item(snap)  # raises if the index holds vectors of dead rows
    with Catalog(refreshed, read_only=True) as cat:
        items = cat.items()
        runs = cat.runs("refresh")
    current = dict(zip(items["item_id"].to_pylist(), items["content_hash"].to_pylist()))
    assert {i: v[0] for i, v in content.items()} == current  # every current item, current text
    assert int(snap.index.ntotal) == len(current) * snap.manifest["n"]  # each item once
    assert all(len(v[2]) == snap.manifest["n"] for v in content.values())
    counts = json.loads(runs["counts"][-1].as_py())
    assert counts["items_encoded"] == 15 and counts["ingest_items_new"] == 5 and counts["ingest_items_updated"] == 10


def _encoded_by_last_refresh(db, model_hash) -> dict[str, set[str]]:
    """kind -> ids whose stored vector the latest refresh run wrote."""
    with Catalog(db, read_only=True) as cat:
        run_id = cat.runs("refresh")["run_id"][-1].as_py()
        out = {}
        for kind, id_col in ((E.ITEM, "item_id"), (E.USER, "user_id")):
            table = E.space(cat, model_hash, kind).table
            out[kind] = {r[0] for r in cat.con.execute(f"SELECT {id_col} FROM {table} WHERE run_id = ?",
                                                       [run_id]).fetchall()}
    return out


def _holders(db, item_id) -> set[str]:
    with Catalog(db, read_only=True) as cat:
        return {u for u, h in cat.histories().items() if item_id in h}


def _edit_one(tmp_path, item_id, title, description, category=None) -> str:
    header, row = ["item_id", "title", "description"], [item_id, title, description]
    if category is not None:
        header, row = header + ["category"], row + [category]
    path = tmp_path / f"edit-{item_id}-{len(list(tmp_path.iterdir()))}.tsv"
    path.write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    return str(path)


def test_text_edit_reencodes_exactly_the_item_and_the_users_holding_it(refreshed, tiny_checkpoint, tmp_path):
    with Catalog(refreshed, read_only=True) as cat:
        item = cat.histories()["u03"][0]
        old = cat.items([item]).to_pylist()[0]
    holders = _holders(refreshed, item)
    assert holders and len(holders) < 16
    out = cli("--db", refreshed, "refresh", _edit_one(tmp_path, item, old["title"], "an edited description."),
              "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 1," in out and f"users_encoded {len(holders)}," in out
    assert _encoded_by_last_refresh(refreshed, _hash(tiny_checkpoint)) == {E.ITEM: {item}, E.USER: holders}


def test_category_edit_is_a_text_edit(refreshed, tiny_checkpoint, tmp_path):
    """The model reads "{title}. {category}. {description}": a category-only edit re-encodes the
    item and its holders; setting the same category again re-encodes nothing."""
    with Catalog(refreshed, read_only=True) as cat:
        item = cat.histories()["u04"][-1]
        old = cat.items([item]).to_pylist()[0]
    edit = _edit_one(tmp_path, item, old["title"], old["description"], category="science fiction")
    out = cli("--db", refreshed, "refresh", edit, "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 1," in out
    assert _encoded_by_last_refresh(refreshed, _hash(tiny_checkpoint)) == \
        {E.ITEM: {item}, E.USER: _holders(refreshed, item)}
    out = cli("--db", refreshed, "refresh", edit, "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 0," in out and "users_encoded 0," in out


def test_second_refresh_changes_nothing(refreshed, tiny_checkpoint, tmp_path):
    nightly = _changes(tmp_path)
    cli("--db", refreshed, "refresh", nightly, "--checkpoint", tiny_checkpoint)
    root = refreshed.with_suffix(".index")
    version = S.current_version(root)
    out = cli("--db", refreshed, "refresh", nightly, "--checkpoint", tiny_checkpoint).output
    assert "items_encoded 0" in out and "users_encoded 0" in out and "index_action unchanged" in out
    assert S.current_version(root) == version and len(S.versions(root)) == 2


def test_large_drift_rebuilds(refreshed, tiny_checkpoint, tmp_path):
    nightly = _changes(tmp_path, changed=12, new=0)
    out = cli("--db", refreshed, "refresh", nightly, "--checkpoint", tiny_checkpoint, "--index-max-drift", 0.1).output
    assert "index_action build" in out


def test_second_refresh_exits_at_once_while_one_runs(refreshed, tiny_checkpoint):
    with exclusive(lock_path(refreshed)):
        t0 = time.monotonic()
        result = cli("--db", refreshed, "refresh", "--checkpoint", tiny_checkpoint, ok=False)
        assert time.monotonic() - t0 < 60  # at once: no waiting on the lock (generous bound)
    assert result.exit_code == 1 and "another refresh is already running" in result.output
    assert "Traceback" not in result.output
    cli("--db", refreshed, "refresh", "--checkpoint", tiny_checkpoint)  # lock released


READER = r"""
import json, sys, time
from pathlib import Path
from embsum.index.catalog import Catalog
from embsum.offline.job_configs import ScoreConfig
from embsum.offline.scoring import Retriever, read_users

db, root, model_hash, stop = sys.argv[1:5]
with Catalog(db, read_only=True) as cat:          # reads the user side, then lets go
    users = read_users(cat, model_hash, None, seen=True)
retriever = Retriever(root, model_hash, ScoreConfig(top=5, retrieve=3))
seen = [users.seen[u] for u in users.ids]
while not Path(stop).exists():
    reloaded = retriever.maybe_reload()
    recs = retriever.recommend(users.upe, seen)
    print(json.dumps({"t": time.time(), "version": retriever.version, "items": retriever.snap.manifest["n_items"],
                      "answers": sum(len(r) for r in recs), "reloaded": reloaded}), flush=True)
    time.sleep(0.02)
"""


def test_scoring_process_keeps_answering_across_a_swap(refreshed, tiny_checkpoint, tmp_path):
    root = refreshed.with_suffix(".index")
    old = S.current_version(root)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(refreshed), str(root), _hash(tiny_checkpoint),
                               str(stop)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(reader.stdout.readline())  # answering from the old index
        assert first["version"] == old and first["answers"] > 0
        started = time.time()
        cli("--db", refreshed, "refresh", _changes(tmp_path), "--checkpoint", tiny_checkpoint)
        finished = time.time()
        new = S.current_version(root)
        assert new != old
        deadline = time.monotonic() + 120
        lines = [first]
        while lines[-1]["version"] != new and time.monotonic() < deadline:
            lines.append(json.loads(reader.stdout.readline()))
        stop.touch()
        rest, err = reader.communicate(timeout=60)
    finally:
        stop.touch()
        if reader.poll() is None:
            reader.kill()
    lines += [json.loads(x) for x in rest.splitlines() if x.strip()]
    assert reader.returncode == 0, err
    versions = [x["version"] for x in lines]
    assert versions[0] == old and versions[-1] == new, versions
    # it kept answering from the old version while the refresh ran
    assert any(x["version"] == old and started <= x["t"] <= finished for x in lines)
    assert all(x["answers"] == 16 * 5 for x in lines)  # every query answered in full
    assert lines[-1]["items"] == 53 and sum(x["reloaded"] for x in lines) == 1
    assert versions == sorted(versions)  # old, ..., old, new, ..., new: never back
