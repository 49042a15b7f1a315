"""The DuckDB catalog: one file holding items, users, interactions, summaries, embeddings,
runs and rejects.

Rules every writer follows (see DESIGN.md, "Storage"):
- bulk data goes in and out through Arrow tables, never row by row;
- every batch is committed in its own transaction (`Catalog.transaction()`), so a killed job
  leaves whole batches only and a re-run picks up from there;
- every job opens a row in `runs` and every bad input row lands in `rejects`.

DuckDB allows one writer process per file; readers of another process wait for the lock, so
jobs open the catalog for as short as they can and fetch results completely.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

SCHEMA_VERSION = 1

# Tables owned by the catalog core. Embedding tables are created per model shape by
# index/embeddings.py; summaries by the summary stage's columns below.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS items (
        item_id VARCHAR PRIMARY KEY,
        title VARCHAR,
        description VARCHAR,
        category VARCHAR,
        content_hash VARCHAR NOT NULL,
        source VARCHAR,
        updated_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS users (
        user_id VARCHAR PRIMARY KEY,
        history_hash VARCHAR,
        source VARCHAR,
        updated_at TIMESTAMP NOT NULL
    )""",
    # One row per (user, item, position). position orders a user's history (0 = oldest);
    # ts is the event time where the source has one; label is 1 (clicked/read), 0 (shown,
    # not clicked) or NULL (implicit positive from a history list).
    """CREATE TABLE IF NOT EXISTS interactions (
        user_id VARCHAR NOT NULL,
        item_id VARCHAR NOT NULL,
        position INTEGER NOT NULL,
        ts TIMESTAMP,
        label SMALLINT,
        source VARCHAR,
        PRIMARY KEY (user_id, position, item_id)
    )""",
    # Keyed by summary_key = hash(history, prompt, model) so a nightly re-run only redoes users
    # whose history changed. flagged rows are kept for inspection, never used as targets.
    """CREATE TABLE IF NOT EXISTS summaries (
        user_id VARCHAR NOT NULL,
        summary_key VARCHAR NOT NULL,
        summary VARCHAR,
        backend VARCHAR,
        model VARCHAR,
        prompt_hash VARCHAR,
        history_hash VARCHAR,
        flagged BOOLEAN NOT NULL DEFAULT FALSE,
        flag_reason VARCHAR,
        created_at TIMESTAMP NOT NULL,
        PRIMARY KEY (user_id, summary_key)
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        started_at TIMESTAMP NOT NULL,
        ended_at TIMESTAMP,
        status VARCHAR NOT NULL,
        counts VARCHAR,
        args VARCHAR,
        error VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS rejects (
        run_id VARCHAR,
        source VARCHAR,
        line BIGINT,
        raw VARCHAR,
        reason VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    )""",
]


class CatalogError(Exception):
    """A catalog problem worth one clear line to the user (no traceback)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Catalog:
    """A DuckDB catalog file. Use as a context manager; `read_only=True` for readers."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = str(path)
        self.read_only = read_only
        if read_only and not Path(self.path).exists():
            raise CatalogError(f"catalog {self.path} does not exist (run `embsum ingest` first)")
        try:
            self.con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as err:
            raise CatalogError(f"cannot open catalog {self.path}: {err}") from None
        except duckdb.Error as err:
            raise CatalogError(f"{self.path} is not a readable DuckDB catalog: {err}") from None
        if not read_only:
            self._migrate()

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def _migrate(self) -> None:
        with self.transaction():
            for ddl in SCHEMA:
                self.con.execute(ddl)
            self.con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic unit of work: committed whole or rolled back whole."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        else:
            self.con.execute("COMMIT")

    # -- generic helpers ---------------------------------------------------------------------
    def arrow(self, sql: str, params: list | None = None) -> pa.Table:
        """Run a query and fetch it completely as Arrow (an unfinished result blocks the connection)."""
        return self.con.sql(sql, params=params or None).to_arrow_table()

    def scalar(self, sql: str, params: list | None = None):
        row = self.con.execute(sql, params or []).fetchone()
        return None if row is None else row[0]

    def count(self, table: str) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {table}"))

    def tables(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = 'main' ORDER BY 1").fetchall()]

    # -- runs ----------------------------------------------------------------------------------
    def start_run(self, kind: str, args: dict | None = None) -> str:
        run_id = f"{kind}-{now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        with self.transaction():
            self.con.execute(
                "INSERT INTO runs (run_id, kind, started_at, status, args) VALUES (?, ?, ?, 'running', ?)",
                [run_id, kind, now(), json.dumps(args or {}, default=str, sort_keys=True)],
            )
        return run_id

    def finish_run(self, run_id: str, status: str, counts: dict | None = None, error: str | None = None) -> None:
        with self.transaction():
            self.con.execute(
                "UPDATE runs SET ended_at = ?, status = ?, counts = ?, error = ? WHERE run_id = ?",
                [now(), status, json.dumps(counts or {}, default=str, sort_keys=True), error, run_id],
            )

    @contextlib.contextmanager
    def run(self, kind: str, args: dict | None = None) -> Iterator["RunRecord"]:
        """Record a job in `runs`: 'running' now, then 'ok' or 'failed' (with the error)."""
        record = RunRecord(self.start_run(kind, args))
        try:
            yield record
        except BaseException as err:
            self.finish_run(record.run_id, "failed", record.counts, error=f"{type(err).__name__}: {err}")
            raise
        else:
            self.finish_run(record.run_id, record.status, record.counts)

    def runs(self, kind: str | None = None) -> pa.Table:
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        return self.arrow(f"SELECT * FROM runs {where} ORDER BY started_at", params)

    # -- rejects -------------------------------------------------------------------------------
    def add_rejects(self, rejects: list[dict], run_id: str | None, source: str) -> int:
        """Append bad input rows: dicts with `line`, `raw`, `reason`. Call inside the batch's
        transaction so a batch and its rejects commit together."""
        if not rejects:
            return 0
        table = pa.table({
            "run_id": pa.array([run_id] * len(rejects), pa.string()),
            "source": pa.array([source] * len(rejects), pa.string()),
            "line": pa.array([r.get("line") for r in rejects], pa.int64()),
            "raw": pa.array([None if r.get("raw") is None else str(r["raw"])[:4000] for r in rejects], pa.string()),
            "reason": pa.array([r["reason"] for r in rejects], pa.string()),
            "created_at": pa.array([now()] * len(rejects), pa.timestamp("us")),
        })
        self.con.register("_rejects_in", table)
        try:
            self.con.execute("INSERT INTO rejects SELECT * FROM _rejects_in")
        finally:
            self.con.unregister("_rejects_in")
        return len(rejects)


class RunRecord:
    """What a job reports about itself while it runs (counts end up in `runs.counts`)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.counts: dict = {}
        self.status = "ok"

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


# -- hashes shared by every stage (ingest, summarize, precompute, refresh) ----------------------
def _sha1(parts: list[str]) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in parts:
        h.update(("" if p is None else str(p)).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def content_hash(title: str | None, description: str | None, category: str | None = None) -> str:
    """What an item's embedding depends on: a changed text changes the hash, nothing else does."""
    return _sha1([title or "", description or "", category or ""])


def history_hash(item_ids: list[str]) -> str:
    """What a user's summary and UPE depend on: the ordered list of positive item ids."""
    return _sha1(list(item_ids))
