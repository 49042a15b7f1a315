"""Embedding tables: exact Arrow round trip, keyed by (id, model, content/history hash)."""

import numpy as np
import pyarrow as pa
import pytest
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog, CatalogError

N, n, d = 40, 3, 8
H1, H2 = "a" * 40, "b" * 40


@pytest.fixture
def cat(db_file):
    with Catalog(db_file) as c:
        c.upsert_items(pa.table({"item_id": [f"i{k:03d}" for k in range(N)],
                                 "title": [f"title {k}" for k in range(N)], "description": ["d"] * N}))
        yield c


def _vectors(seed, rows=N, codes=n):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, codes, d)).astype(np.float32)


def _write_all(cat, model_hash, seed=0):
    keys = cat.items().select(["item_id", "content_hash"])
    sp = E.ensure_space(cat, model_hash, E.ITEM, n, d)
    cpe, cpe_prime = _vectors(seed), _vectors(seed + 1)
    with cat.transaction():
        E.write_items(cat, sp, keys["item_id"].to_pylist(), keys["content_hash"].to_pylist(), cpe, cpe_prime)
    return cpe, cpe_prime


def test_arrow_round_trip_is_exact(cat):
    cpe, cpe_prime = _write_all(cat, H1)
    block = E.read(cat, H1, E.ITEM)
    assert block.ids == [f"i{k:03d}" for k in range(N)]
    assert np.array_equal(block.vectors["cpe"], cpe) and np.array_equal(block.vectors["cpe_prime"], cpe_prime)
    # DuckDB FLOAT[d][n] is n arrays of d floats: the numpy shape [n, d].
    assert f"FLOAT[{d}][{n}]" in str(cat.con.execute(f"DESCRIBE {E.table_name('item', n, d)}").fetchall())


def test_models_never_mix_and_rewrites_replace(cat):
    cpe1, _ = _write_all(cat, H1, seed=0)
    cpe2, _ = _write_all(cat, H2, seed=10)
    assert np.array_equal(E.read(cat, H1, E.ITEM).vectors["cpe"], cpe1)
    assert np.array_equal(E.read(cat, H2, E.ITEM).vectors["cpe"], cpe2)
    _write_all(cat, H1, seed=20)  # a re-encode replaces, never duplicates
    assert E.count(cat, H1, E.ITEM) == N and E.count(cat, H2, E.ITEM) == N
    assert E.read(cat, "c" * 40, E.ITEM) is None


def test_missing_and_current_follow_content_hash(cat):
    keys = cat.items().select(["item_id", "content_hash"])
    assert E.missing(cat, H1, E.ITEM, keys).num_rows == N  # nothing stored yet
    _write_all(cat, H1)
    assert E.missing(cat, H1, E.ITEM, keys).num_rows == 0
    cat.upsert_items(pa.table({"item_id": ["i001", "i002", "new"], "title": ["edited", "edited", "new"],
                               "description": ["x", "x", "x"]}))
    keys = cat.items().select(["item_id", "content_hash"])
    assert E.missing(cat, H1, E.ITEM, keys)["item_id"].to_pylist() == ["i001", "i002", "new"]
    # stale rows are never read as current, but still stored until replaced
    assert len(E.read(cat, H1, E.ITEM)) == N - 2
    assert len(E.read(cat, H1, E.ITEM, current=False)) == N
    assert E.read(cat, H1, E.ITEM, ids=["i001", "i003", "nope"]).ids == ["i003"]


def test_iterate_pages_everything_once(cat):
    _write_all(cat, H1)
    blocks = list(E.iterate(cat, H1, E.ITEM, chunk_size=7))
    assert [len(b) for b in blocks] == [7] * 5 + [5]
    assert [i for b in blocks for i in b.ids] == [f"i{k:03d}" for k in range(N)]


def test_shape_conflict_and_delete(cat):
    _write_all(cat, H1)
    with pytest.raises(CatalogError, match="shape"):
        E.ensure_space(cat, H1, E.ITEM, n + 1, d)
    sp = E.space(cat, H1, E.ITEM)
    with cat.transaction():
        assert E.delete(cat, sp, ["i000", "i001", "zzz"]) == 2
    assert E.count(cat, H1, E.ITEM) == N - 2


def test_user_vectors(cat):
    sp = E.ensure_space(cat, H1, E.USER, 2, d)
    upe = _vectors(3, rows=2, codes=2)
    with cat.transaction():
        E.write_users(cat, sp, ["u1", "u2"], ["h1", "h2"], upe)
    block = E.read(cat, H1, E.USER, current=False)
    assert block.ids == ["u1", "u2"] and np.array_equal(block.vectors["upe"], upe)
    assert len(E.read(cat, H1, E.USER)) == 0  # no such users in `users`: not current


def test_bulk_writes_survive_a_kill_before_any_checkpoint_and_restore_settings(cat):
    """Chunks committed under `bulk_writes` live only in the WAL until ~256 MB accumulate: a
    process killed then must still find them, exact, when the catalog is reopened."""
    import subprocess
    import sys

    settings = "SELECT current_setting('checkpoint_threshold'), current_setting('disabled_compression_methods')"
    before = cat.con.execute(settings).fetchall()
    with E.bulk_writes(cat):
        assert cat.con.execute(settings).fetchall() != before
    assert cat.con.execute(settings).fetchall() == before
    path = cat.path
    cat.close()
    code = (
        "import os, numpy as np\n"
        "from embsum.index.catalog import Catalog\n"
        "from index import embeddings as E\n"
        f"cat = Catalog({str(path)!r})\n"
        "keys = cat.items().select(['item_id', 'content_hash'])\n"
        f"sp = E.ensure_space(cat, {H1!r}, E.ITEM, {n}, {d})\n"
        f"x = np.random.default_rng(0).standard_normal(({N}, {n}, {d})).astype(np.float32)\n"
        "with E.bulk_writes(cat):\n"
        "    with cat.transaction():\n"
        "        E.write_items(cat, sp, keys['item_id'].to_pylist(), keys['content_hash'].to_pylist(), x, -x)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    with Catalog(path) as again:
        block = E.read(again, H1, E.ITEM)
    assert len(block.ids) == N
    np.testing.assert_array_equal(block.vectors["cpe"], _vectors(0))
    np.testing.assert_array_equal(block.vectors["cpe_prime"], -_vectors(0))


def test_missing_items_come_shortest_first_in_whole_chunks(cat):
    lengths = {f"i{k:03d}": len(f"title {k}") + 1 for k in range(N)}
    total, chunks = E.missing_items_by_length(cat, H1, 16)
    chunks = list(chunks)
    assert total == N and [c.num_rows for c in chunks] == [16, 16, 8]
    got = [i for c in chunks for i in c["item_id"].to_pylist()]
    assert got == sorted(lengths, key=lambda i: (lengths[i], i))  # by text length, then id
    assert chunks[0].column_names == ["item_id", "title", "description", "category", "content_hash"]
    _write_all(cat, H1)
    cat.upsert_items(pa.table({"item_id": ["i005", "i017"], "title": ["a much longer title now", "t"],
                               "description": ["d", "d"]}))
    total, chunks = E.missing_items_by_length(cat, H1, 16)
    assert total == 2 and [c["item_id"].to_pylist() for c in chunks] == [["i017", "i005"]]
    assert E.missing_items_by_length(cat, H2, 100)[0] == N  # another model: everything
