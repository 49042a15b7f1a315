"""FAISS snapshots: build, incremental update == rebuild, atomic swap, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from embsum.index import embeddings as E
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog

N, n, d = 120, 4, 16
H = "f" * 40


def _put(cat, ids, seed):
    keys = cat.items(ids).select(["item_id", "content_hash"])
    rng = np.random.default_rng(seed)
    sp = E.ensure_space(cat, H, E.ITEM, n, d)
    with cat.transaction():
        E.write_items(cat, sp, keys["item_id"].to_pylist(), keys["content_hash"].to_pylist(),
                      rng.standard_normal((keys.num_rows, n, d)).astype(np.float32),
                      rng.standard_normal((keys.num_rows, n, d)).astype(np.float32))


def _items(ids, title="t"):
    return pa.table({"item_id": ids, "title": [f"{title} {i}" for i in ids], "description": ["d"] * len(ids)})


@pytest.fixture
def cat(db_file):
    with Catalog(db_file) as c:
        ids = [f"i{k:04d}" for k in range(N)]
        c.upsert_items(_items(ids))
        _put(c, ids, seed=0)
        yield c


def _blocks(cat, chunk=50):
    return F.Blocks(n, d, E.count(cat, H, E.ITEM, current=True),
                    lambda: E.iterate(cat, H, E.ITEM, chunk_size=chunk), lambda ids: E.read(cat, H, E.ITEM, ids))


def _assert_same(a, b):
    ia, ib = F.by_item(a), F.by_item(b)
    assert sorted(ia) == sorted(ib)
    for k in ia:
        assert ia[k][0] == ib[k][0]
        np.testing.assert_array_equal(ia[k][1], ib[k][1])
        np.testing.assert_array_equal(ia[k][2], ib[k][2])


@pytest.mark.parametrize("mode", ["multi", "pooled"])
def test_build_then_search_maps_back_to_items(cat, tmp_path, mode):
    cfg = F.IndexConfig(mode=mode)
    version, manifest = F.build(tmp_path / "idx", H, _blocks(cat), cfg)
    snap = S.load(tmp_path / "idx", H)
    assert snap.version == version and manifest["factory"] == "IDMap2,Flat"
    assert manifest["n_items"] == N and manifest["n_vectors"] == N * (n if mode == "multi" else 1)
    # an item's own (pooled) vector finds that item first
    q = F.item_vectors(np.asarray(snap.cpe[7:8]), "pooled") * 100
    _, ids = F.search(snap.index, q, 5)
    hits = F.rows_of(ids, n, mode)[0]
    assert 7 in hits.tolist()


def test_incremental_update_equals_rebuild(cat, tmp_path):
    cfg = F.IndexConfig()
    F.build(tmp_path / "idx", H, _blocks(cat), cfg)
    snap = S.load(tmp_path / "idx", H)
    changed, new = [f"i{k:04d}" for k in range(0, 20, 2)], [f"n{k}" for k in range(5)]
    cat.upsert_items(_items(changed + new, title="edited"))
    _put(cat, changed + new, seed=1)
    cat.con.execute("DELETE FROM items WHERE item_id IN ('i0100', 'i0101')")  # removed items
    diff = F.diff(snap, E.keys(cat, H, E.ITEM))
    assert (sorted(diff.changed), diff.new, diff.removed) == (changed, new, ["i0100", "i0101"])
    assert F.needs_rebuild(snap, diff, N + 3, cfg) is None
    _, man = F.update(tmp_path / "idx", snap, diff, _blocks(cat), cfg)
    assert (man["added"], man["replaced"], man["removed"], man["n_items"]) == (5, 10, 2, N + 3)
    F.build(tmp_path / "full", H, _blocks(cat), cfg)
    _assert_same(S.load(tmp_path / "idx", H), S.load(tmp_path / "full", H))
    # nothing changed: the diff is empty
    assert F.diff(S.load(tmp_path / "idx"), E.keys(cat, H, E.ITEM)).size == 0


def _edit(cat, changed, new, removed, seed):
    cat.upsert_items(_items(changed + new, title=f"edit {seed}"))
    _put(cat, changed + new, seed=seed)
    for i in removed:
        cat.con.execute("DELETE FROM items WHERE item_id = ?", [i])


@pytest.mark.parametrize("mode", ["multi", "pooled"])
def test_chained_updates_write_only_the_overlay_and_equal_a_rebuild(cat, tmp_path, mode):
    cfg = F.IndexConfig(mode=mode, keep=2)
    root = tmp_path / "idx"
    first, _ = F.build(root, H, _blocks(cat), cfg)
    inode = (root / first / S.INDEX_FILE).stat().st_ino
    _edit(cat, [f"i{k:04d}" for k in range(0, 10, 2)], ["n0", "n1"], ["i0100"], seed=1)
    snap = S.load(root, H)
    F.update(root, snap, F.diff(snap, E.keys(cat, H, E.ITEM)), _blocks(cat), cfg)
    # again: an overlay row edited twice, a base row, an overlay item and an overlay row removed
    _edit(cat, ["i0000", "i0050"], ["n9"], ["n1", "i0002"], seed=2)
    snap = S.load(root, H)
    version, man = F.update(root, snap, F.diff(snap, E.keys(cat, H, E.ITEM)), _blocks(cat), cfg)
    assert first not in S.versions(root)  # the full build's folder is pruned; its files live on in links
    vdir = root / version
    assert (vdir / S.INDEX_FILE).stat().st_ino == inode
    updated = S.load(root, H)
    names = updated.item_ids()
    # every row edited or added since the full build, less the removed ones; nothing else
    assert sorted(names[r] for r in np.load(vdir / S.OVERLAY_ROWS)) == \
        ["i0000", "i0004", "i0006", "i0008", "i0050", "n0", "n9"]
    assert man["overlay_rows"] == 7 and man["changed_since_build"] == 8 + 5 and man["n_items"] == N + 3 - 3
    assert updated.index.ntotal == man["n_vectors"]
    F.build(tmp_path / "full", H, _blocks(cat), cfg)
    _assert_same(updated, S.load(tmp_path / "full", H))
    assert F.diff(updated, E.keys(cat, H, E.ITEM)).size == 0


def test_row_vectors_index_like_an_array():
    base = np.arange(5 * 2, dtype=np.float32).reshape(5, 2, 1)
    rows = S.RowVectors(base, np.full((2, 2, 1), -1, np.float32), np.array([1, 5]), n_rows=6)
    full = np.concatenate([base, np.full((1, 2, 1), -1, np.float32)])
    full[1] = -1
    assert rows.shape == (6, 2, 1) and len(rows) == 6
    for key in (0, 1, -1, slice(None), slice(2, 6), np.array([5, 0, 1]), np.array([[1, 2], [3, 5]])):
        np.testing.assert_array_equal(rows[key], full[key])
    np.testing.assert_array_equal(np.asarray(rows), full)


def test_drift_and_size_call_for_rebuild(cat, tmp_path):
    F.build(tmp_path / "idx", H, _blocks(cat), F.IndexConfig())
    snap = S.load(tmp_path / "idx")
    big = F.Diff(new=[], changed=[f"i{k:04d}" for k in range(30)], removed=[])
    assert "drift" in F.needs_rebuild(snap, big, N, F.IndexConfig(max_drift=0.2))
    assert "factory" in F.needs_rebuild(snap, F.Diff([], [], []), N, F.IndexConfig(flat_threshold=10))
    assert F.choose_factory(10) == "IDMap2,Flat" and F.choose_factory(1_000_000).startswith("IVF")


def test_ivf_index_builds_updates_and_searches(cat, tmp_path):
    cfg = F.IndexConfig(factory="IVF8,Flat", nprobe=8, train_size=400)
    _, manifest = F.build(tmp_path / "idx", H, _blocks(cat), cfg)
    assert manifest["nprobe"] == 8
    snap = S.load(tmp_path / "idx", H)
    cat.upsert_items(_items(["i0003"], title="edited"))
    _put(cat, ["i0003"], seed=5)
    F.update(tmp_path / "idx", snap, F.diff(snap, E.keys(cat, H, E.ITEM)), _blocks(cat), cfg)
    F.build(tmp_path / "full", H, _blocks(cat), cfg)
    a, b = F.by_item(S.load(tmp_path / "idx")), F.by_item(S.load(tmp_path / "full"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k][2], b[k][2]) for k in a)


def test_reader_keeps_old_version_across_swap_and_pruning(cat, tmp_path):
    cfg = F.IndexConfig(keep=2)
    F.build(tmp_path / "idx", H, _blocks(cat), cfg)
    old = S.load(tmp_path / "idx", H)
    for _ in range(3):  # old version gets pruned from disk
        F.build(tmp_path / "idx", H, _blocks(cat), cfg)
    assert len(S.versions(tmp_path / "idx")) == 2 and old.version not in S.versions(tmp_path / "idx")
    _, ids = F.search(old.index, np.ones((1, d), np.float32), 3)  # still answers: files stay open
    assert np.isfinite(np.asarray(old.cpe[F.rows_of(ids[0], n, "multi")])).all()
    assert S.load(tmp_path / "idx").version != old.version


def test_clear_errors(cat, tmp_path):
    with pytest.raises(S.IndexFileError, match="no index at"):
        S.load(tmp_path / "nothing")
    F.build(tmp_path / "idx", H, _blocks(cat), F.IndexConfig())
    with pytest.raises(S.IndexFileError, match="built for model ffffffffffff, not 000000000000"):
        S.load(tmp_path / "idx", "0" * 40)
    vdir = tmp_path / "idx" / S.current_version(tmp_path / "idx")
    size = (vdir / S.INDEX_FILE).stat().st_size
    os.truncate(vdir / S.INDEX_FILE, size // 2)
    with pytest.raises(S.IndexFileError, match="truncated"):
        S.load(tmp_path / "idx", H)
    (vdir / S.INDEX_FILE).write_bytes(b"\0" * size)  # right size, garbage inside
    with pytest.raises(S.IndexFileError, match="cannot read index file"):
        S.load(tmp_path / "idx", H)
    (vdir / S.INDEX_FILE).unlink()
    with pytest.raises(S.IndexFileError, match="missing"):
        S.load(tmp_path / "idx", H)


@pytest.mark.parametrize("point", ["snapshot.before_rename", "snapshot.before_swap"])
def test_killed_writer_leaves_previous_version_live(cat, tmp_path, point):
    root = tmp_path / "idx"
    F.build(root, H, _blocks(cat), F.IndexConfig())
    before = S.current_version(root)
    cat.close()
    code = (
        "import sys\n"
        "from embsum.index.catalog import Catalog\n"
        "from index import embeddings as E, faiss_index as F\n"
        f"cat = Catalog({str(cat.path)!r})\n"
        f"H = {H!r}\n"
        f"b = F.Blocks({n}, {d}, E.count(cat, H, E.ITEM, current=True), lambda: E.iterate(cat, H, E.ITEM), None)\n"
        f"F.build({str(root)!r}, H, b, F.IndexConfig())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "EMBSUM_KILL_AT": point},
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert S.current_version(root) == before
    S.load(root, H)  # still loads
    with Catalog(cat.path) as again:  # the next writer cleans the dead writer's temp folder
        F.build(root, H, _blocks(again), F.IndexConfig())
    assert not list(root.glob(".tmp-*")) and S.current_version(root) != before
