"""The DuckDB catalog: one file holding items, users, interactions, summaries, embeddings,
runs and rejects.

Rules every writer follows (see DESIGN.md, "Storage"):
- bulk data goes in and out through Arrow tables, never row by row;
- every batch is committed in its own transaction (`Catalog.transaction()`), so a killed job
  leaves whole batches only and a re-run picks up from there;
- every job opens a row in `runs` and every bad input row lands in `rejects`.

Sharing the file between processes (issue 13). DuckDB lets one process at a time have the file
open for writing, and while any process has it open (even read-only) no other can open it to
write; an unfinished query result blocks its connection. So:
- a long job (precompute) opens the catalog with `keep_open=False` and calls `release()` while
  its model computes: it holds the file only while it reads its work list or commits a chunk
  (a second or so), and the next use reconnects (settings made with `configured()` are
  re-applied; temp tables and registered Arrow views die with the connection, so nothing may
  rely on them across a release);
- every open retries for up to `wait_s` seconds while another process holds the file, so a
  reader (`info`, `evaluate`, `score`) gets in between two commits and a job's commit waits out
  a reader; past the deadline it raises `CatalogBusy` (exit 75) naming the holder. This class is
  the one place a catalog is opened, so DuckDB's raw lock message never reaches the user;
- writer jobs (`job="precompute"`, ...) first take the catalog's job lock (index/lock.py): they
  take turns, a waiting one says for whom (`waiting for precompute run <id> (pid N, started
  HH:MM)`), and it is taken before any model is loaded, so a busy catalog fails in a second.
All results are fetched completely (`arrow`, `scalar`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from .errors import CatalogBusy, StorageError
from .lock import JobLock, busy_holder

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("embsum.catalog")

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


# A positive interaction (clicked/read, or an implicit one from a history list): what a history holds.
_POSITIVE = "(i.label IS NULL OR i.label = 1)"
# Every user the catalog knows of: in `users`, or with interactions only.
_KNOWN_USERS = "WITH known AS (SELECT user_id FROM users UNION SELECT user_id FROM interactions)"

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
    """A DuckDB catalog file. Use as a context manager; `read_only=True` for readers.

    `wait_s`: how long an open (or a reconnect after `release()`) waits while another process
    holds the file before raising CatalogBusy; 0, the library default, fails at once.
    `job`: a writer job's kind ("precompute", "ingest", ...): take the catalog's job lock first,
    waiting up to `wait_s` for the job that holds it (see the module docstring).
    `keep_open=False`: `release()` really closes the connection, for a job that wants readers
    in while it computes; with the default True, `release()` does nothing."""

    def __init__(self, path: str | Path, read_only: bool = False, *, wait_s: float = 0.0,
                 job: str | None = None, keep_open: bool = True):
        self.path = str(path)
        self.read_only = read_only
        self.wait_s = wait_s
        self.keep_open = keep_open
        self.job_lock: JobLock | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._settings: dict[str, str] = {}
        self._tx_depth = 0
        if read_only and not Path(self.path).exists():
            raise CatalogError(f"catalog {self.path} does not exist (run `embsum ingest` first)")
        try:
            if job is not None and not read_only:
                self.job_lock = JobLock(self.path, job).acquire(wait_s)
            self.connect()
            if not read_only:
                self._migrate()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection, reopened on first use after a `release()`."""
        return self.connect()

    def connect(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = _open(self.path, self.read_only, self.wait_s)
            for name, value in self._settings.items():
                self._con.execute(f"SET {name} = '{value}'")
        return self._con

    def release(self) -> None:
        """Let other processes open the file until the next use (`keep_open=False` only; never
        inside a transaction). Closing checkpoints what this connection wrote into the file."""
        if self.keep_open or self._tx_depth or self._con is None:
            return
        con, self._con = self._con, None
        con.close()

    def close(self) -> None:
        con, self._con = self._con, None
        try:
            if con is not None:
                con.close()
        finally:
            if self.job_lock is not None:
                self.job_lock.release()

    @contextlib.contextmanager
    def configured(self, **settings: str) -> Iterator[None]:
        """DuckDB settings (`SET name = 'value'`) for the block, re-applied on every reconnect;
        the previous values come back after."""
        names = list(settings)
        before = self.con.execute("SELECT " + ", ".join(f"current_setting('{k}')" for k in names)).fetchall()[0]
        outer = dict(self._settings)
        self._settings.update(settings)
        for name, value in settings.items():
            self.con.execute(f"SET {name} = '{value}'")
        try:
            yield
        finally:
            self._settings = outer
            if self._con is not None:  # released: a reconnect starts from the defaults anyway
                for name, value in zip(names, before):
                    self._con.execute(f"SET {name} = '{value}'")

    def _migrate(self) -> None:
        with self.transaction():
            for ddl in SCHEMA:
                self.con.execute(ddl)
            self.con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )
        self.upgrade_keys()  # item/user keys: see `upgrade_keys` (hashes region, issue 13)

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

    def finish_run(self, run_id: str, status: str, counts: dict | None = None, error: str | None = None,
                   args: dict | None = None) -> None:
        """End a run. `args` (when given) replaces the recorded arguments: a job may only learn some
        of them (a model hash, a resolved device) after it started."""
        with self.transaction():
            self.con.execute(
                "UPDATE runs SET ended_at = ?, status = ?, counts = ?, error = ? WHERE run_id = ?",
                [now(), status, json.dumps(counts or {}, default=str, sort_keys=True), error, run_id],
            )
            if args is not None:
                self.con.execute("UPDATE runs SET args = ? WHERE run_id = ?",
                                 [json.dumps(args, default=str, sort_keys=True), run_id])

    @contextlib.contextmanager
    def run(self, kind: str, args: dict | None = None) -> Iterator[RunRecord]:
        """Record a job in `runs`: 'running' now, then 'ok', 'failed' (with the error) or
        'interrupted' (Ctrl-C/SIGTERM, with the counts so far). Open it before the job's first
        step that can fail (loading a model, reading inputs), so every failure leaves its row."""
        record = RunRecord(self.start_run(kind, args), args)
        try:
            yield record
        except BaseException as err:
            status, error = run_outcome(err)
            try:
                self.finish_run(record.run_id, status, record.counts, error=error, args=record.args)
            except Exception as ledger_err:  # noqa: BLE001 - e.g. the connection died with the job: keep its error
                import logging

                logging.getLogger("embsum").warning("could not record run %s as %s: %s", record.run_id, status,
                                                    one_line(ledger_err))
            raise
        else:
            self.finish_run(record.run_id, record.status, record.counts, error=record.error, args=record.args)

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
        """Insert new items, update those whose model text (`item_text`) changed, leave the others
        untouched (their `updated_at` stays). `table`: `item_id`, `title`, `description`, optional
        `category`; ids must be unique within the table. The users whose history holds an updated
        item get their new history hash in the same transaction, so a refresh re-encodes them.
        Returns counts `new`, `updated`, `unchanged` (items) and `users_changed`."""
        n = table.num_rows
        cols = {c: (table.column(c).to_pylist() if c in table.column_names else [None] * n)
                for c in ITEM_COLUMNS}
        stamp = now()
        incoming = pa.table({
            **{c: pa.array(cols[c], pa.string()) for c in ITEM_COLUMNS},
            "content_hash": pa.array(
                [item_key(t, d, c) for t, d, c in zip(cols["title"], cols["description"], cols["category"])],
                pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "updated_at": pa.array([stamp] * n, pa.timestamp("us")),
        })
        names = ", ".join(incoming.column_names)
        with self.transaction(), self.registered("_items_in", incoming):
            new = self.scalar("SELECT count(*) FROM _items_in n ANTI JOIN items i USING (item_id)")
            changed = [r[0] for r in self.con.execute(
                "SELECT n.item_id FROM _items_in n JOIN items i USING (item_id)"
                " WHERE i.content_hash <> n.content_hash").fetchall()]
            updates = ", ".join(f"{c} = excluded.{c}" for c in incoming.column_names[1:])
            self.con.execute(
                f"INSERT INTO items ({names}) SELECT {names} FROM _items_in"
                f" ON CONFLICT (item_id) DO UPDATE SET {updates}"
                " WHERE items.content_hash <> excluded.content_hash")
            users_changed = self.refresh_users(self._users_holding(changed)) if changed else 0
        return {"new": int(new), "updated": len(changed), "unchanged": n - int(new) - len(changed),
                "users_changed": users_changed}

    def _users_holding(self, item_ids) -> list[str]:
        """Users with any of `item_ids` among their positive items (whose history hash covers them)."""
        with self.registered("_held_ids", self._ids_table(item_ids)):
            return [r[0] for r in self.con.execute(
                f"SELECT DISTINCT i.user_id FROM interactions i WHERE {_POSITIVE}"
                " AND i.item_id IN (SELECT id FROM _held_ids) ORDER BY 1").fetchall()]

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
        """Set `users.history_hash = history_hash(history_keys()[user])` for these users (adding
        missing users); only users whose hash changed get a new `updated_at`. Returns that count."""
        hashes = {u: history_hash(keys) for u, keys in self.history_keys(user_ids).items()}
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

    def upgrade_keys(self) -> bool:
        """Once per catalog written before KEY_VERSION: every item and user gets its key under
        today's definition (a one-time re-encode follows, since stored vectors carry the old
        keys); summaries written for a user's unchanged history are carried over to the new
        key instead of being asked for again. Returns whether it re-keyed."""
        if self.scalar("SELECT value FROM meta WHERE key = 'key_version'") == KEY_VERSION:
            return False
        from .summaries import summary_key  # summaries.py imports this module

        with self.transaction():
            old = dict(self.con.execute("SELECT user_id, history_hash FROM users").fetchall())
            for chunk in self.iter_items(50_000):
                keys = [item_key(*row) for row in zip(*(chunk[c].to_pylist() for c in ITEM_COLUMNS[1:]))]
                rekeyed = pa.table({"item_id": chunk["item_id"], "content_hash": pa.array(keys, pa.string())})
                with self.registered("_rekeyed", rekeyed):
                    self.con.execute("UPDATE items SET content_hash = r.content_hash FROM _rekeyed r"
                                     " WHERE items.item_id = r.item_id AND items.content_hash <> r.content_hash")
            self.refresh_users(list(old))
            new = dict(self.con.execute("SELECT user_id, history_hash FROM users").fetchall())
            moved = [(u, h, new[u]) for u, h in old.items() if h is not None and new.get(u) not in (None, h)]
            moves = pa.table({name: pa.array([m[k] for m in moved], pa.string())
                              for k, name in enumerate(("user_id", "old_hash", "new_hash"))})
            with self.registered("_moves", moves):
                carried = self.arrow("SELECT s.*, m.new_hash FROM summaries s JOIN _moves m"
                                     " ON s.user_id = m.user_id AND s.history_hash = m.old_hash")
                self.con.execute("DELETE FROM summaries s USING _moves m"
                                 " WHERE s.user_id = m.user_id AND s.history_hash = m.old_hash")
            new_hashes = carried["new_hash"].to_pylist()
            carried = carried.drop_columns(["new_hash"])
            carried = carried.set_column(carried.schema.get_field_index("history_hash"), "history_hash",
                                         pa.array(new_hashes, pa.string()))
            carried = carried.set_column(carried.schema.get_field_index("summary_key"), "summary_key", pa.array(
                [summary_key(h, p, m) for h, p, m in zip(new_hashes, carried["prompt_hash"].to_pylist(),
                                                         carried["model"].to_pylist())], pa.string()))
            with self.registered("_carried", carried):
                self.con.execute(f"INSERT OR REPLACE INTO summaries ({', '.join(carried.column_names)})"
                                 f" SELECT {', '.join(carried.column_names)} FROM _carried")
            self.con.execute("INSERT OR REPLACE INTO meta VALUES ('key_version', ?)", [KEY_VERSION])
        return True

    def _per_user(self, value: str, user_ids) -> dict[str, list[str]]:
        """user_id -> `value` (an expression over interactions `i` and items `it`) of each of the
        user's positive items, oldest first, for every known user (or those of `user_ids`)."""
        sql = (
            _KNOWN_USERS +
            f" SELECT k.user_id, list({value} ORDER BY i.ts NULLS FIRST, i.position, i.item_id)"
            "   FILTER (WHERE i.item_id IS NOT NULL)"
            f" FROM known k LEFT JOIN interactions i ON i.user_id = k.user_id AND {_POSITIVE}"
            " LEFT JOIN items it ON it.item_id = i.item_id"
            " {where} GROUP BY k.user_id ORDER BY k.user_id")
        return {u: list(values or []) for u, values in self._known_users_rows(sql, user_ids)}

    def _known_users_rows(self, sql: str, user_ids) -> list[tuple]:
        """Rows of `sql` (over `known k`, with a `{where}` slot) for all users or `user_ids`."""
        if user_ids is None:
            return self.con.execute(sql.format(where="")).fetchall()
        with self.registered("_user_ids", self._ids_table(user_ids)):
            return self.con.execute(sql.format(where="WHERE k.user_id IN (SELECT id FROM _user_ids)")).fetchall()

    def histories(self, user_ids=None) -> dict[str, list[str]]:
        """user_id -> the user's positive items (label NULL or 1), oldest first: ordered by ts
        (rows without a time, such as history lists, come first), then position. Every known
        user (in `users` or `interactions`) has an entry, possibly an empty list; with
        `user_ids`, only those of them that are known."""
        return self._per_user("i.item_id", user_ids)

    def history_keys(self, user_ids=None) -> dict[str, list[str]]:
        """Like `histories`, with each item's content key instead of its id: what
        `history_hash` covers. An item missing from `items` (never after an ingest, which
        rejects such rows) stands in by its id, so its arrival changes the key."""
        return self._per_user("coalesce(it.content_hash, 'missing:' || i.item_id)", user_ids)

    def interacted(self, user_ids=None) -> dict[str, list[str]]:
        """user_id -> every item the user has an interaction with, whatever the label (1, 0 or
        NULL), sorted and distinct: what a recommendation must leave out. Every known user has
        an entry, possibly empty; with `user_ids`, only those of them that are known."""
        sql = (
            _KNOWN_USERS +
            " SELECT k.user_id, list(DISTINCT i.item_id) FILTER (WHERE i.item_id IS NOT NULL)"
            " FROM known k LEFT JOIN interactions i ON i.user_id = k.user_id"
            " {where} GROUP BY k.user_id ORDER BY k.user_id")
        return {u: sorted(items or []) for u, items in self._known_users_rows(sql, user_ids)}

    def item_holders(self) -> dict[str, int]:
        """item_id -> how many distinct users hold the item as a positive (label NULL or 1): the
        n_i of a model's popularity prior, read when scoring (items nobody holds are absent)."""
        return dict(self.con.execute(
            f"SELECT i.item_id, count(DISTINCT i.user_id) FROM interactions i WHERE {_POSITIVE}"
            " GROUP BY i.item_id").fetchall())

    def meta_value(self, key: str) -> str | None:
        return self.scalar("SELECT value FROM meta WHERE key = ?", [key])

    def set_meta_value(self, key: str, value: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    def users(self, user_ids=None) -> pa.Table:
        """Columns user_id, history_hash, in user_id order (all, or those of `user_ids` that exist)."""
        if user_ids is None:
            return self.arrow("SELECT user_id, history_hash FROM users ORDER BY user_id")
        with self.registered("_user_ids", self._ids_table(user_ids)):
            return self.arrow("SELECT user_id, history_hash FROM users"
                              " WHERE user_id IN (SELECT id FROM _user_ids) ORDER BY user_id")


# "Could not set lock on file ...: Conflicting lock is held in /usr/bin/python3.11 (PID 123)"
_LOCK_CONFLICT = re.compile(r"Could not set lock on file")
_LOCK_PID = re.compile(r"\(PID (\d+)\)")


def _open(path: str, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """duckdb.connect, retried for up to `wait_s` while another process holds the file; every
    failure becomes one line of ours (CatalogBusy or CatalogError), never DuckDB's text on locks."""
    deadline = time.monotonic() + wait_s
    delay, told = 0.02, False
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as err:
            if not _LOCK_CONFLICT.search(str(err)):
                raise CatalogError(f"cannot open catalog {path}: {err}") from None
            pid = _LOCK_PID.search(str(err))
            holder = _holder_name(path, int(pid.group(1)) if pid else 0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CatalogBusy(f"catalog {path} is locked by {holder}; gave up after waiting {wait_s:g} s"
                                  " (--wait SECONDS to wait longer)") from None
            if not told and wait_s - left > 2:  # a commit takes a second or so: only say longer waits
                log.warning("catalog %s is locked by %s; waiting up to %.0f s more ...", path, holder, left)
                told = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)
        except duckdb.Error as err:
            raise CatalogError(f"{path} is not a readable DuckDB catalog: {err}") from None


def _holder_name(path: str, pid: int) -> str:
    """The writer job when it is the process holding the file, else the bare process."""
    job = busy_holder(path)
    if job is not None and (job.pid == pid or not pid):
        return job.describe()
    return f"process {pid}" if pid else "another process"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunRecord:
    """What a job reports about itself while it runs (counts end up in `runs.counts`; `args`
    may be completed once the job knows them, e.g. the model hash after loading the model)."""

    def __init__(self, run_id: str, args: dict | None = None):
        self.run_id = run_id
        self.args: dict = dict(args or {})
        self.counts: dict = {}
        self.status = "ok"
        self.error: str | None = None

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, error: str) -> None:
        """The job ends without raising but did not do its work (e.g. every input row rejected)."""
        self.status, self.error = "failed", one_line(error)


def one_line(err: BaseException | str, limit: int = 1000) -> str:
    """An error as one line for the ledger (multi-line driver messages collapsed, long ones cut)."""
    text = " ".join(str(err).split())
    if isinstance(err, BaseException):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_outcome(err: BaseException) -> tuple[str, str]:
    """(status, error) a run ends with when `err` escapes it: Ctrl-C and SIGTERM (which the CLI
    turns into KeyboardInterrupt) are 'interrupted', anything else 'failed'."""
    if isinstance(err, KeyboardInterrupt) or type(err).__name__ == "Interrupted":
        # embsum.offline.errors.Interrupted is matched by name: index/ never imports offline/.
        return "interrupted", "interrupted (Ctrl-C or SIGTERM); committed batches are kept"
    return "failed", one_line(err)


# -- hashes shared by every stage (ingest, summarize, precompute, refresh) ----------------------
def _sha1(parts: list[str]) -> str:
    import hashlib

    h = hashlib.sha1()
    for p in parts:
        h.update(("" if p is None else str(p)).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


# What a vector depends on, defined once. The text is defined here, not in offline/, because the
# catalog keys every item as it is ingested (`upsert_items`, called by ingest, tests, benchmarks)
# and index/ never imports offline/; `embsum.offline.texts.item_text` is this function.
KEY_VERSION = "2"  # 1: item keys hashed (title, description, category), user keys item ids


def item_text(title: str | None, description: str | None, category: str | None = None) -> str:
    """Exactly the text a model reads for an item: `"{title}. {category}. {description}"`, a
    missing or blank part left out, so an item without a category reads `"{title}. {description}"`
    (the goodreads-v1 template, kept literal so figures stay comparable)."""
    parts = ((p or "").strip() for p in (title, category, description))
    return ". ".join(p for p in parts if p)


def content_hash(text: str) -> str:
    """An item's key: the hash of exactly the text the model reads (`item_text`), nothing else,
    so an edit that leaves that text alone re-encodes nothing."""
    return _sha1([text])


def item_key(title: str | None, description: str | None, category: str | None = None) -> str:
    """`content_hash(item_text(...))`: the key `upsert_items` stores in `items.content_hash`."""
    return content_hash(item_text(title, description, category))


def history_hash(content_keys: list[str]) -> str:
    """A user's key: the content keys of the user's positive items, oldest first (what the UPE
    and the summary are computed from: those items' texts in that order; the summary itself is
    not read at encode time). Editing one of those items changes it."""
    return _sha1(list(content_keys))
