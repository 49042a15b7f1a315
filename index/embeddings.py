"""Item and user poly-embeddings stored in the catalog.

Vectors are fixed-size DuckDB arrays written and read through Arrow (never row by row, never
`fetchnumpy`, which yields object arrays for nested types). A model's shape decides the table:
`item_embeddings_{n}x{d}` holds `cpe` and `cpe_prime` (n vectors of d floats each) and
`user_embeddings_{m}x{d}` holds `upe`; the registry table `embedding_spaces` maps a model hash to
its tables, so readers only need the hash.

Keys: one row per (item_id, model_hash) carrying the `content_hash` it was computed from (and
per (user_id, model_hash) with the `history_hash`). Both keys are defined in index/catalog.py: an
item's is the hash of exactly the text the model reads (`item_text`), a user's covers the content
keys of the history items in order, so an edit re-encodes the item and the users holding it. A reader asks for the rows whose hash equals
the catalog's current hash, so a stale vector (text changed since) or another checkpoint's vector
is never returned; a re-encode replaces the row, so the table never grows with edits.

Note DuckDB's array syntax reads inside out: `FLOAT[d][n]` is n arrays of d floats, i.e. the
numpy shape [n, d].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .catalog import Catalog, CatalogError, now

ITEM, USER = "item", "user"

REGISTRY_DDL = """CREATE TABLE IF NOT EXISTS embedding_spaces (
    model_hash VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    table_name VARCHAR NOT NULL,
    n INTEGER NOT NULL,
    d INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (model_hash, kind)
)"""

# kind -> (id column, hash column, vector columns)
_LAYOUT = {
    ITEM: ("item_id", "content_hash", ("cpe", "cpe_prime")),
    USER: ("user_id", "history_hash", ("upe",)),
}
# kind -> (catalog table holding the current hash, its id column): current rows join on it.
_CURRENT = {ITEM: ("items", "item_id"), USER: ("users", "user_id")}


@dataclass(frozen=True)
class Space:
    """Where one model's vectors of one kind live, and their shape [n, d]."""

    model_hash: str
    kind: str
    table: str
    n: int
    d: int


def table_name(kind: str, n: int, d: int) -> str:
    return f"{kind}_embeddings_{int(n)}x{int(d)}"


def _ensure_registry(cat: Catalog) -> None:
    cat.con.execute(REGISTRY_DDL)


def space(cat: Catalog, model_hash: str, kind: str) -> Space | None:
    """The registered table of `model_hash`'s `kind` vectors, or None if none were written."""
    if "embedding_spaces" not in cat.tables():
        return None
    # fetchall, not fetchone: a partly fetched result blocks the connection (duckdb >= 2).
    rows = cat.con.execute(
        "SELECT table_name, n, d FROM embedding_spaces WHERE model_hash = ? AND kind = ?",
        [model_hash, kind]).fetchall()
    return Space(model_hash, kind, rows[0][0], int(rows[0][1]), int(rows[0][2])) if rows else None


def ensure_space(cat: Catalog, model_hash: str, kind: str, n: int, d: int) -> Space:
    """Create (once) the table for this shape and register the model hash against it. A model
    hash is one checkpoint, so a second shape for it means a corrupted caller: refuse."""
    existing = space(cat, model_hash, kind)
    if existing is not None:
        if (existing.n, existing.d) != (n, d):
            raise CatalogError(
                f"model {model_hash[:12]} already has {kind} vectors of shape "
                f"[{existing.n}, {existing.d}], not [{n}, {d}]")
        return existing
    id_col, hash_col, vec_cols = _LAYOUT[kind]
    name = table_name(kind, n, d)
    vectors = ", ".join(f"{c} FLOAT[{int(d)}][{int(n)}] NOT NULL" for c in vec_cols)
    with cat.transaction():
        _ensure_registry(cat)
        cat.con.execute(
            f"CREATE TABLE IF NOT EXISTS {name} ({id_col} VARCHAR NOT NULL, model_hash VARCHAR NOT NULL,"
            f" {hash_col} VARCHAR NOT NULL, {vectors}, dtype VARCHAR, run_id VARCHAR,"
            f" created_at TIMESTAMP NOT NULL, PRIMARY KEY ({id_col}, model_hash))")
        cat.con.execute("INSERT OR IGNORE INTO embedding_spaces VALUES (?, ?, ?, ?, ?, ?)",
                        [model_hash, kind, name, int(n), int(d), now()])
    return Space(model_hash, kind, name, int(n), int(d))


# -- numpy <-> Arrow ---------------------------------------------------------------------------
def to_arrow(x: np.ndarray) -> pa.FixedSizeListArray:
    """[N, n, d] float32 -> Arrow fixed_size_list<fixed_size_list<float, d>, n> (zero copy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected [N, n, d] vectors, got shape {x.shape}")
    _, n, d = x.shape
    return pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d), n)


def from_arrow(col: pa.ChunkedArray | pa.Array, n: int, d: int) -> np.ndarray:
    """The inverse of `to_arrow`: a float32 array [N, n, d] (vectors are NOT NULL, so the flat
    child buffer is exactly N*n*d floats)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(col), n, d)


def _ids(ids) -> pa.Table:
    return pa.table({"id": pa.array(list(dict.fromkeys(ids)), pa.string())})


# -- writes (call inside the chunk's transaction) -----------------------------------------------
def write(cat: Catalog, sp: Space, ids: list[str], hashes: list[str], vectors: dict[str, np.ndarray],
          dtype: str = "fp32", run_id: str | None = None) -> int:
    """Insert or replace the rows for `ids`: a re-encoded item replaces its old row, so every
    (id, model) appears once. Call inside a transaction. `vectors`: column -> [N, n, d]."""
    id_col, hash_col, vec_cols = _LAYOUT[sp.kind]
    count = len(ids)
    if count == 0:
        return 0
    for c in vec_cols:
        if vectors[c].shape != (count, sp.n, sp.d):
            raise ValueError(f"{c}: expected shape {(count, sp.n, sp.d)}, got {vectors[c].shape}")
    table = pa.table({
        id_col: pa.array(ids, pa.string()),
        "model_hash": pa.array([sp.model_hash] * count, pa.string()),
        hash_col: pa.array(hashes, pa.string()),
        **{c: to_arrow(vectors[c]) for c in vec_cols},
        "dtype": pa.array([dtype] * count, pa.string()),
        "run_id": pa.array([run_id] * count, pa.string()),
        "created_at": pa.array([now()] * count, pa.timestamp("us")),
    })
    names = ", ".join(table.column_names)
    with cat.registered("_emb_in", table):
        # DELETE + INSERT, not INSERT OR REPLACE: the latter needs ~20x the chunk's size in
        # DuckDB memory for nested arrays (2048 rows of 2x[8][384] floats went over 1 GB).
        cat.con.execute(f"DELETE FROM {sp.table} WHERE model_hash = ? AND {id_col} IN (SELECT {id_col} FROM _emb_in)",
                        [sp.model_hash])
        cat.con.execute(f"INSERT INTO {sp.table} ({names}) SELECT {names} FROM _emb_in")
    return count


# Settings for a job that commits many vector chunks (`bulk_writes`). `benchmarks/vector_writes.py`
# (24 commits of 2,048 rows of 2x[8][384] real floats, 512 MB memory limit, medians of 3): 29.5 s
# with DuckDB's defaults, 18.0 s with these, and a 1,199 MB file instead of 1,501 MB. By default
# every commit of such a chunk (50 MB, over the 16 MiB threshold) triggers a checkpoint that
# rewrites the open row group and runs ALP-RD compression over floats it barely compresses.
BULK_WRITE_SETTINGS = {"checkpoint_threshold": "256MB", "disabled_compression_methods": "alp,alprd"}


@contextlib.contextmanager
def bulk_writes(cat: Catalog) -> Iterator[None]:
    """Checkpoint every ~256 MB of WAL instead of at every chunk, and store vector floats
    uncompressed, for the duration of a job; the previous settings come back after. Committed
    chunks are durable either way (the WAL is fsynced at commit and replayed after a kill)."""
    names = list(BULK_WRITE_SETTINGS)
    before = cat.con.execute("SELECT " + ", ".join(f"current_setting('{k}')" for k in names)).fetchall()[0]
    try:
        for k, v in BULK_WRITE_SETTINGS.items():
            cat.con.execute(f"SET {k} = '{v}'")
        yield
    finally:
        for k, v in zip(names, before):
            cat.con.execute(f"SET {k} = '{v}'")


def write_items(cat: Catalog, sp: Space, item_ids, content_hashes, cpe, cpe_prime, **kw) -> int:
    return write(cat, sp, list(item_ids), list(content_hashes), {"cpe": cpe, "cpe_prime": cpe_prime}, **kw)


def write_users(cat: Catalog, sp: Space, user_ids, history_hashes, upe, **kw) -> int:
    return write(cat, sp, list(user_ids), list(history_hashes), {"upe": upe}, **kw)


def delete(cat: Catalog, sp: Space, ids) -> int:
    id_col = _LAYOUT[sp.kind][0]
    ids = list(ids)
    if not ids:
        return 0
    with cat.registered("_emb_del", _ids(ids)):
        rows = cat.con.execute(f"DELETE FROM {sp.table} WHERE model_hash = ? AND {id_col} IN"
                               " (SELECT id FROM _emb_del)", [sp.model_hash]).fetchall()
    return int(rows[0][0]) if rows else 0


# -- reads -------------------------------------------------------------------------------------
def missing(cat: Catalog, model_hash: str, kind: str, keys: pa.Table) -> pa.Table:
    """The rows of `keys` (columns: the kind's id and hash columns, plus anything else) that have
    no stored vector for exactly that (id, model, hash): what a resumed or incremental job still
    has to encode. Order of `keys` is kept."""
    id_col, hash_col, _ = _LAYOUT[kind]
    sp = space(cat, model_hash, kind)
    if sp is None or keys.num_rows == 0:
        return keys
    keys = keys.append_column("_row", pa.array(np.arange(keys.num_rows), pa.int64()))
    with cat.registered("_emb_keys", keys.select([id_col, hash_col, "_row"])):
        rows = cat.arrow(
            f"SELECT k._row FROM _emb_keys k ANTI JOIN {sp.table} e ON e.{id_col} = k.{id_col}"
            f" AND e.{hash_col} = k.{hash_col} AND e.model_hash = ? ORDER BY k._row", [model_hash])
    return keys.take(rows.column("_row")).drop_columns(["_row"])


def missing_items_by_length(cat: Catalog, model_hash: str, chunk_size: int) -> tuple[int, Iterator[pa.Table]]:
    """(how many, their chunks): the items with no vector for their current text under
    `model_hash`, shortest text first (ties by id), `chunk_size` rows at a time (the columns of
    `cat.iter_items`).

    One global length order instead of id-ordered pages sorted one by one: a chunk then holds
    texts of about the same length, so its batches carry almost no padding. The order is fixed
    when the job starts (a temp table of ids, so memory holds one chunk), and chunks are
    committed whole: a resumed run's missing set is the first run's less a prefix of this
    order, so it cuts exactly the chunks an uninterrupted run would have."""
    sp = space(cat, model_hash, ITEM)
    unstored = "" if sp is None else (
        f" WHERE NOT EXISTS (SELECT 1 FROM {sp.table} e WHERE e.item_id = i.item_id"
        " AND e.content_hash = i.content_hash AND e.model_hash = ?)")
    order = "_missing_items_order"
    cat.con.execute(
        f"CREATE OR REPLACE TEMP TABLE {order} AS SELECT item_id, row_number() OVER (ORDER BY"
        " length(coalesce(title, '')) + length(coalesce(category, '')) + length(coalesce(description, '')),"
        " item_id) AS pos"
        f" FROM items i{unstored}", [] if sp is None else [model_hash])
    total = int(cat.scalar(f"SELECT count(*) FROM {order}"))

    def chunks() -> Iterator[pa.Table]:
        try:
            for start in range(0, total, chunk_size):
                yield cat.arrow(
                    "SELECT i.item_id, i.title, i.description, i.category, i.content_hash FROM"
                    f" {order} o JOIN items i USING (item_id) WHERE o.pos > ? AND o.pos <= ? ORDER BY o.pos",
                    [start, start + chunk_size])
        finally:
            cat.con.execute(f"DROP TABLE IF EXISTS {order}")

    return total, chunks()


def _select(sp: Space, current: bool, filtered: bool = False, vectors: bool = True) -> str:
    """SELECT id, hash[, vectors] of one model; `current` keeps rows whose hash is the catalog's
    current one; `filtered` restricts to the ids registered as `_emb_ids`."""
    id_col, hash_col, vec_cols = _LAYOUT[sp.kind]
    cur_table, cur_id = _CURRENT[sp.kind]
    join = (f" SEMI JOIN {cur_table} c ON c.{cur_id} = e.{id_col} AND c.{hash_col} = e.{hash_col}"
            if current else "")
    where = f" AND e.{id_col} IN (SELECT id FROM _emb_ids)" if filtered else ""
    cols = ", ".join(f"e.{c}" for c in (id_col, hash_col, *(vec_cols if vectors else ())))
    return f"SELECT {cols} FROM {sp.table} e{join} WHERE e.model_hash = ?{where}"


@dataclass
class Block:
    """Vectors read back: ids, the hash each was computed from, and [N, n, d] arrays."""

    ids: list[str]
    hashes: list[str]
    vectors: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def _block(sp: Space, table: pa.Table) -> Block:
    """Rows -> Block in id order. The sort happens here, in Arrow, on the fetched rows: an
    ORDER BY in DuckDB would sort the vector columns too, which under a memory limit fails."""
    id_col, hash_col, vec_cols = _LAYOUT[sp.kind]
    table = table.sort_by(id_col)
    return Block(table.column(id_col).to_pylist(), table.column(hash_col).to_pylist(),
                 {c: from_arrow(table.column(c), sp.n, sp.d) for c in vec_cols})


def _empty(sp: Space) -> Block:
    return Block([], [], {c: np.zeros((0, sp.n, sp.d), np.float32) for c in _LAYOUT[sp.kind][2]})


def read(cat: Catalog, model_hash: str, kind: str, ids=None, current: bool = True) -> Block | None:
    """The vectors of `ids` (all when None) in id order; `current=True` keeps only rows computed
    from the catalog's current content/history hash. None when the model has no such vectors."""
    sp = space(cat, model_hash, kind)
    if sp is None:
        return None
    if ids is None:
        return _block(sp, cat.arrow(_select(sp, current), [model_hash]))
    ids = list(ids)
    if not ids:
        return _empty(sp)
    with cat.registered("_emb_ids", _ids(ids)):
        return _block(sp, cat.arrow(_select(sp, current, True), [model_hash]))


def iterate(cat: Catalog, model_hash: str, kind: str, chunk_size: int = 2048,
            current: bool = True) -> Iterator[Block]:
    """All vectors in id order, `chunk_size` rows at a time: a keyset page of ids first (strings
    only), then the page's rows by id range (a filter DuckDB pushes into the scan)."""
    sp = space(cat, model_hash, kind)
    if sp is None:
        return
    id_col = _LAYOUT[kind][0]
    last = None
    while True:
        after, params = (f" AND e.{id_col} > ?", [model_hash, last]) if last is not None else ("", [model_hash])
        page = cat.arrow(_select(sp, current, vectors=False) + after + f" ORDER BY e.{id_col} LIMIT {int(chunk_size)}",
                         params)
        if page.num_rows == 0:
            return
        first_id, last_id = page.column(id_col)[0].as_py(), page.column(id_col)[-1].as_py()
        rows = cat.arrow(_select(sp, current) + f" AND e.{id_col} >= ? AND e.{id_col} <= ?",
                         [model_hash, first_id, last_id])
        yield _block(sp, rows)
        last = last_id


def keys(cat: Catalog, model_hash: str, kind: str, current: bool = True) -> pa.Table:
    """(id, hash) of every stored vector of the model, id order: cheap, no vectors."""
    id_col, hash_col, _ = _LAYOUT[kind]
    sp = space(cat, model_hash, kind)
    if sp is None:
        return pa.table({id_col: pa.array([], pa.string()), hash_col: pa.array([], pa.string())})
    return cat.arrow(_select(sp, current, vectors=False) + f" ORDER BY e.{id_col}", [model_hash])


def count(cat: Catalog, model_hash: str, kind: str, current: bool = False) -> int:
    return keys(cat, model_hash, kind, current).num_rows
