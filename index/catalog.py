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
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from index.errors import StorageError

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
    # Which process runs a job, so a later job can tell a crashed run from a live one.
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR",
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid BIGINT",
    """CREATE TABLE IF NOT EXISTS rejects (
        run_id VARCHAR,
        source VARCHAR,
        line BIGINT,
        raw VARCHAR,
        reason VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    )""",
]


# The item columns a source provides (content_hash, source, updated_at are derived).
ITEM_COLUMNS = ("item_id", "title", "description", "category")


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    """`table[name]` cast to the catalog's type, or all NULL where the source has no such column."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type_)
    return table.column(name).combine_chunks().cast(type_)


class CatalogError(StorageError):
    """A catalog problem worth one clear line to the user (no traceback)."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Catalog:
    """A DuckDB catalog file. Use as a context manager; `read_only=True` for readers."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = str(path)
        self.read_only = read_only
        self._tx_depth = 0
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
    def __enter__(self) -> Catalog:
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
        """One atomic unit of work: committed whole or rolled back whole.

        Re-entrant: a nested call joins the outer transaction, so helpers such as
        `upsert_items` are atomic on their own and also compose into one batch transaction."""
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield self.con
            finally:
                self._tx_depth -= 1
            return
        self.con.execute("BEGIN TRANSACTION")
        self._tx_depth = 1
        try:
            yield self.con
        except BaseException:
            self._tx_depth = 0
            self.con.execute("ROLLBACK")
            raise
        else:
            self._tx_depth = 0
            self.con.execute("COMMIT")

    # -- generic helpers ---------------------------------------------------------------------
    def arrow(self, sql: str, params: list | None = None) -> pa.Table:
        """Run a query and fetch it completely as Arrow (an unfinished result blocks the connection)."""
        return self.con.sql(sql, params=params or None).to_arrow_table()

    def scalar(self, sql: str, params: list | None = None):
        # fetchall, not fetchone: DuckDB keeps a half-read result open and refuses the next
        # register()/execute() on this connection until it is drained.
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0][0] if rows else None

    def count(self, table: str) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {table}"))

    def tables(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = 'main' ORDER BY 1").fetchall()]

    # -- runs ----------------------------------------------------------------------------------
    def start_run(self, kind: str, args: dict | None = None) -> str:
        run_id = f"{kind}-{now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        with self.transaction():
            self.mark_interrupted_runs()
            self.con.execute(
                "INSERT INTO runs (run_id, kind, started_at, status, args, host, pid) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?)",
                [run_id, kind, now(), json.dumps(args or {}, default=str, sort_keys=True),
                 socket.gethostname(), os.getpid()],
            )
        return run_id

    def mark_interrupted_runs(self) -> list[str]:
        """'running' rows of this host whose process is gone (killed, crashed, power cut) become
        'interrupted', so `runs` tells what really happened. Rows of other hosts are left alone:
        their processes cannot be checked from here."""
        rows = self.con.execute("SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?",
                                [socket.gethostname()]).fetchall()
        gone = [(run_id, pid) for run_id, pid in rows if pid is not None and not _process_alive(pid)]
        for run_id, pid in gone:
            self.con.execute("UPDATE runs SET status = 'interrupted', ended_at = ?, error = ? WHERE run_id = ?",
                             [now(), f"process {pid} ended without finishing the run", run_id])
        return [run_id for run_id, _ in gone]

    def finish_run(self, run_id: str, status: str, counts: dict | None = None, error: str | None = None) -> None:
        with self.transaction():
            self.con.execute(
                "UPDATE runs SET ended_at = ?, status = ?, counts = ?, error = ? WHERE run_id = ?",
                [now(), status, json.dumps(counts or {}, default=str, sort_keys=True), error, run_id],
            )

    @contextlib.contextmanager
    def run(self, kind: str, args: dict | None = None) -> Iterator[RunRecord]:
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
        with self.registered("_rejects_in", table):
            self.con.execute("INSERT INTO rejects SELECT * FROM _rejects_in")
        return len(rejects)

    def clear_rejects(self, source: str) -> int:
        """Forget the rejects recorded for `source` (a file path): an ingest calls this before
        it reads the file again, so rejects always describe the latest ingest of each file and a
        re-run after a killed run leaves exactly one copy of each (idempotent re-ingest)."""
        n = int(self.scalar("SELECT count(*) FROM rejects WHERE source = ?", [source]))
        if n:
            self.con.execute("DELETE FROM rejects WHERE source = ?", [source])
        return n

    @contextlib.contextmanager
    def registered(self, name: str, table: pa.Table) -> Iterator[str]:
        """An Arrow table visible to SQL as `name` for the duration of the block."""
        self.con.register(name, table)
        try:
            yield name
        finally:
            self.con.unregister(name)

    def _ids_table(self, ids) -> pa.Table:
        return pa.table({"id": pa.array(list(dict.fromkeys(ids)), pa.string())})

    # -- items -----------------------------------------------------------------------------------
    def upsert_items(self, table: pa.Table, source: str | None = None) -> dict[str, int]:
        """Insert new items, update those whose text changed, leave the others untouched (their
        `updated_at` stays). `table`: `item_id`, `title`, `description`, optional `category`;
        ids must be unique within the table. Returns counts `new`, `updated`, `unchanged`."""
        n = table.num_rows
        cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * n)
                for c in ITEM_COLUMNS}
        stamp = now()
        incoming = pa.table({
            **{c: pa.array(cols[c], pa.string()) for c in ITEM_COLUMNS},
            "content_hash": pa.array(
                [content_hash(t, d, c) for t, d, c in zip(cols["title"], cols["description"], cols["category"])],
                pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "updated_at": pa.array([stamp] * n, pa.timestamp("us")),
        })
        names = ", ".join(incoming.column_names)
        with self.transaction(), self.registered("_items_in", incoming):
            new, changed = self.con.execute(
                "SELECT count(*) FILTER (WHERE i.item_id IS NULL),"
                "       count(*) FILTER (WHERE i.content_hash <> n.content_hash)"
                " FROM _items_in n LEFT JOIN items i USING (item_id)").fetchall()[0]
            updates = ", ".join(f"{c} = excluded.{c}" for c in incoming.column_names[1:])
            self.con.execute(
                f"INSERT INTO items ({names}) SELECT {names} FROM _items_in"
                f" ON CONFLICT (item_id) DO UPDATE SET {updates}"
                " WHERE items.content_hash <> excluded.content_hash")
        return {"new": int(new), "updated": int(changed), "unchanged": n - int(new) - int(changed)}

    def items(self, item_ids=None) -> pa.Table:
        """Items in `item_id` order (all, or those of `item_ids` that exist): columns
        item_id, title, description, category, content_hash."""
        cols = "i.item_id, i.title, i.description, i.category, i.content_hash"
        if item_ids is None:
            return self.arrow(f"SELECT {cols} FROM items i ORDER BY i.item_id")
        with self.registered("_item_ids", self._ids_table(item_ids)):
            return self.arrow(f"SELECT {cols} FROM items i SEMI JOIN _item_ids q ON q.id = i.item_id"
                              " ORDER BY i.item_id")

    def iter_items(self, chunk_size: int = 10_000) -> Iterator[pa.Table]:
        """All items in `item_id` order, `chunk_size` at a time (keyset pages: stable across
        calls, so a resumable job can restart after the last id it finished)."""
        last = None
        while True:
            where, params = ("WHERE item_id > ?", [last]) if last is not None else ("", [])
            chunk = self.arrow(
                "SELECT item_id, title, description, category, content_hash FROM items"
                f" {where} ORDER BY item_id LIMIT {int(chunk_size)}", params)
            if chunk.num_rows == 0:
                return
            yield chunk
            last = chunk.column("item_id")[-1].as_py()

    def existing_items(self, item_ids) -> set[str]:
        """The subset of `item_ids` present in `items` (interaction ingest rejects the rest)."""
        with self.registered("_item_ids", self._ids_table(item_ids)):
            rows = self.con.execute("SELECT q.id FROM _item_ids q SEMI JOIN items i ON i.item_id = q.id").fetchall()
        return {r[0] for r in rows}

    # -- interactions and users --------------------------------------------------------------------
    def upsert_interactions(self, table: pa.Table, source: str | None = None,
                            replace_users: bool = False) -> dict[str, int]:
        """Load interactions (`user_id`, `item_id`, `position`, optional `ts`, `label`) and keep
        `users.history_hash` current for every user in `table`.

        replace_users=False (event logs: MIND behaviors, rating files): rows are added, or their
        ts/label updated; nothing is deleted. replace_users=True (snapshot sources whose record
        is a user's whole history, Goodreads users.jsonl): a user whose stored rows differ from
        the given ones gets exactly the given rows; an identical user is not touched.
        Returns counts `new`, `updated`, `unchanged` (rows) and `users_changed`."""
        n = table.num_rows
        incoming = pa.table({
            "user_id": _column(table, "user_id", pa.string()),
            "item_id": _column(table, "item_id", pa.string()),
            "position": _column(table, "position", pa.int32()),
            "ts": _column(table, "ts", pa.timestamp("us")),
            "label": _column(table, "label", pa.int16()),
            "source": pa.array([source] * n, pa.string()),
        })
        key = "user_id, position, item_id"
        facts = "user_id, item_id, position, ts, label"
        with self.transaction(), self.registered("_inter_in", incoming):
            # One row per key (a MIND user's history repeats on each of its impressions).
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE _inter AS SELECT DISTINCT ON ({key}) * "
                             f"FROM _inter_in ORDER BY {key}, ts NULLS FIRST")
            new, changed = self.con.execute(
                "SELECT count(*) FILTER (WHERE i.user_id IS NULL),"
                "       count(*) FILTER (WHERE i.user_id IS NOT NULL AND"
                "         (i.ts IS DISTINCT FROM n.ts OR i.label IS DISTINCT FROM n.label))"
                f" FROM _inter n LEFT JOIN interactions i USING ({key})").fetchall()[0]
            if replace_users:
                self.con.execute(
                    "CREATE OR REPLACE TEMP TABLE _changed AS SELECT DISTINCT user_id FROM ("
                    f" (SELECT {facts} FROM _inter EXCEPT"
                    f"  SELECT {facts} FROM interactions WHERE user_id IN (SELECT user_id FROM _inter))"
                    " UNION ALL"
                    f" (SELECT {facts} FROM interactions WHERE user_id IN (SELECT user_id FROM _inter)"
                    f"  EXCEPT SELECT {facts} FROM _inter))")
                self.con.execute("DELETE FROM interactions WHERE user_id IN (SELECT user_id FROM _changed)")
                self.con.execute(f"INSERT INTO interactions ({facts}, source) SELECT {facts}, source"
                                 " FROM _inter WHERE user_id IN (SELECT user_id FROM _changed)")
                self.con.execute("DROP TABLE _changed")
            else:
                self.con.execute(
                    f"INSERT INTO interactions ({facts}, source) SELECT {facts}, source FROM _inter"
                    f" ON CONFLICT ({key}) DO UPDATE SET ts = excluded.ts, label = excluded.label,"
                    " source = excluded.source"
                    " WHERE interactions.ts IS DISTINCT FROM excluded.ts"
                    "    OR interactions.label IS DISTINCT FROM excluded.label")
            total = int(self.scalar("SELECT count(*) FROM _inter"))
            users = [r[0] for r in self.con.execute("SELECT DISTINCT user_id FROM _inter").fetchall()]
            self.con.execute("DROP TABLE _inter")
            users_changed = self.refresh_users(users, source)
        return {"new": int(new), "updated": int(changed), "unchanged": total - int(new) - int(changed),
                "users_changed": users_changed}

    def refresh_users(self, user_ids, source: str | None = None) -> int:
        """Set `users.history_hash = history_hash(histories()[user])` for these users (adding
        missing users); only users whose hash changed get a new `updated_at`. Returns that count."""
        hashes = {u: history_hash(h) for u, h in self.histories(user_ids).items()}
        incoming = pa.table({
            "user_id": pa.array(list(hashes), pa.string()),
            "history_hash": pa.array(list(hashes.values()), pa.string()),
            "source": pa.array([source] * len(hashes), pa.string()),
            "updated_at": pa.array([now()] * len(hashes), pa.timestamp("us")),
        })
        with self.transaction(), self.registered("_users_in", incoming):
            changed = self.scalar(
                "SELECT count(*) FROM _users_in n LEFT JOIN users u USING (user_id)"
                " WHERE u.history_hash IS DISTINCT FROM n.history_hash")
            self.con.execute(
                "INSERT INTO users SELECT * FROM _users_in ON CONFLICT (user_id) DO UPDATE SET"
                " history_hash = excluded.history_hash, source = excluded.source, updated_at = excluded.updated_at"
                " WHERE users.history_hash IS DISTINCT FROM excluded.history_hash")
        return int(changed)

    def histories(self, user_ids=None) -> dict[str, list[str]]:
        """user_id -> the user's positive items (label NULL or 1), oldest first: ordered by ts
        (rows without a time, such as history lists, come first), then position. Every known
        user (in `users` or `interactions`) has an entry, possibly an empty list; with
        `user_ids`, only those of them that are known."""
        sql = (
            "WITH known AS (SELECT user_id FROM users UNION SELECT user_id FROM interactions)"
            " SELECT k.user_id, list(i.item_id ORDER BY i.ts NULLS FIRST, i.position, i.item_id)"
            "   FILTER (WHERE i.item_id IS NOT NULL)"
            " FROM known k LEFT JOIN interactions i"
            "   ON i.user_id = k.user_id AND (i.label IS NULL OR i.label = 1)"
            " {where} GROUP BY k.user_id ORDER BY k.user_id")
        if user_ids is None:
            rows = self.con.execute(sql.format(where="")).fetchall()
        else:
            with self.registered("_user_ids", self._ids_table(user_ids)):
                rows = self.con.execute(
                    sql.format(where="WHERE k.user_id IN (SELECT id FROM _user_ids)")).fetchall()
        return {u: list(items or []) for u, items in rows}

    def users(self, user_ids=None) -> pa.Table:
        """Columns user_id, history_hash, in user_id order (all, or those of `user_ids` that exist)."""
        if user_ids is None:
            return self.arrow("SELECT user_id, history_hash FROM users ORDER BY user_id")
        with self.registered("_user_ids", self._ids_table(user_ids)):
            return self.arrow("SELECT user_id, history_hash FROM users"
                              " WHERE user_id IN (SELECT id FROM _user_ids) ORDER BY user_id")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
