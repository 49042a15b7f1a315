"""The precompute job: items -> CPE, users -> UPE, from a checkpoint into the catalog.

Streaming and resumable by construction:
- only items with no vector for (item_id, model hash, content hash) are encoded, so a re-run
  after a kill or a Ctrl-C skips every committed row, and a nightly run encodes only new or
  edited items (users: new or changed history hash);
- the work is one global order fixed when the stage starts: items by text length, users by
  history length (ties by id), so a batch holds texts of about the same length (little padding)
  and a nightly run's scattered edits are one chunk. Memory holds the work list (ids and keys)
  and two chunks' texts and vectors, whatever the catalog's size;
- the list is cut into chunks of `chunk_size`; chunk k+1 is encoded in batches of `batch_size`
  on a worker thread while chunk k is written in its own transaction (`encode_ahead`);
- the catalog file is held only while the work list or a chunk is read and while a chunk is
  written: between those the job calls `Catalog.release()` (a no-op unless the catalog was
  opened with `keep_open=False`, as `embsum precompute` does), so `embsum info` and other
  readers get in while the model computes.
Graceful stop (`stop`, set on Ctrl-C/SIGTERM by embsum.offline.interrupts): the worker stops between
two batches, the finished batches of the chunk in flight are committed after the chunk being
written, and the counts say what is left (`items_left`, `users_left`). What is committed is
always a prefix of the work order made of whole batches, so a resumed run cuts the same batches
as an uninterrupted one (when `chunk_size` is a multiple of `batch_size`) and stores the same
vectors; a kill (SIGKILL) loses at most the chunks not yet committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from embsum.index import embeddings as E
from embsum.index import failpoints
from embsum.index.catalog import Catalog, RunRecord
from embsum.offline.job_configs import PrecomputeConfig
from embsum.offline.texts import item_texts

log = logging.getLogger("embsum.precompute")

# Length of the text `item_text` builds (up to its separators): the items' work order.
ITEM_TEXT_LENGTH = ("length(coalesce(title, '')) + length(coalesce(category, ''))"
                    " + length(coalesce(description, ''))")


@dataclass
class Encoded:
    """What the worker finished of one chunk: its first `rows` rows and their vectors (each
    [rows, n, d]); fewer rows than the chunk's only when the job was asked to stop."""

    rows: int
    vectors: tuple[np.ndarray, ...]


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts and, for every input, the index of its text among them."""
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
    return list(first), inverse


def _in_batches(n: int, size: int, encode_batch: Callable[[int, int], tuple], stop: threading.Event | None,
                done: Callable[[int], None]) -> list[tuple]:
    """`encode_batch(start, end)` over [0, n) in steps of `size`, in order; stops before the next
    batch once `stop` is set (a Ctrl-C waits for one batch, not a chunk); `done(end)` after each."""
    parts = []
    for start in range(0, n, size):
        if stop is not None and stop.is_set():
            break
        end = min(start + size, n)
        parts.append(encode_batch(start, end))
        failpoints.hit("precompute.batch_encoded")
        done(end)
    return parts


def _joined(parts: list[tuple], rows: np.ndarray | slice) -> tuple[np.ndarray, ...]:
    """Each output of the batches concatenated, then `rows` of it."""
    if not parts:
        return ()
    return tuple(np.concatenate(column)[rows] for column in zip(*parts))


def encode_items(model, texts: list[str], cfg: PrecomputeConfig, stop: threading.Event | None = None,
                 on_rows: Callable[[int], None] | None = None) -> Encoded:
    """(CPE, CPE') of `texts` (of its first rows only, if `stop` is set meanwhile): each distinct
    text encoded once, `batch_size` distinct texts per forward pass in first-appearance order.
    `on_rows(n)`: n more leading rows are finished (progress)."""
    from embsum.inference.encoding import encode_item_texts

    uniq, inverse = _distinct(texts)
    # The row where each distinct text first appears: once k distinct texts are encoded, every
    # row before first_row[k] is finished (first appearances come in order).
    first_row = np.append(np.unique(inverse, return_index=True)[1], len(texts))
    finished = 0

    def done(end: int) -> None:
        nonlocal finished
        if on_rows is not None:
            on_rows(int(first_row[end]) - finished)
        finished = int(first_row[end])

    parts = _in_batches(len(uniq), cfg.batch_size, lambda s, e: encode_item_texts(
        model, uniq[s:e], batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, progress=False),
        stop, done)
    return Encoded(finished, _joined(parts, inverse[:finished]))


def encode_users(model, histories: list[list[str]], cfg: PrecomputeConfig, stop: threading.Event | None = None,
                 on_rows: Callable[[int], None] | None = None) -> Encoded:
    """UPE of users given by their history texts (of the first ones only, if `stop` is set
    meanwhile), `batch_size` users per call, in the given order."""
    from embsum.inference.encoding import encode_user_histories

    finished = 0

    def done(end: int) -> None:
        nonlocal finished
        if on_rows is not None:
            on_rows(end - finished)
        finished = end

    parts = _in_batches(len(histories), cfg.batch_size, lambda s, e: (encode_user_histories(
        model, histories[s:e], batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, progress=False),),
        stop, done)
    return Encoded(finished, _joined(parts, slice(None)))


def limit_db_memory(cat: Catalog, cfg: PrecomputeConfig) -> None:
    """Cap DuckDB's buffer cache so peak memory stays flat however large the catalog grows."""
    if cfg.db_memory:
        cat.con.execute(f"SET memory_limit = '{cfg.db_memory}'")


def write_settings(cfg: PrecomputeConfig) -> dict[str, str]:
    """DuckDB settings while vectors are written: the bulk-write ones (see E.BULK_WRITE_SETTINGS)
    and the memory cap. Made with `Catalog.configured`, so they survive a release and reconnect."""
    return {**E.BULK_WRITE_SETTINGS, **({"memory_limit": cfg.db_memory} if cfg.db_memory else {})}


def encode_ahead(jobs: Iterable, encode: Callable, write: Callable, stop: threading.Event | None = None) -> None:
    """`write(job, encode(job))` for every job, in order, with job k+1 encoding on a worker
    thread while job k is written here.

    torch releases the GIL in its kernels, so reading the next chunk and the DuckDB write and
    commit of this one (Arrow conversion, WAL fsync) overlap the next chunk's forward passes. At
    most two chunks' vectors are held, and commits stay in chunk order, so memory stays flat and
    a resumed run sees exactly the committed prefix an unpipelined run would. Once `stop` is
    set no further job is read or started; the one in flight is still written (its `encode`
    is expected to return what it finished)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="embsum-encode")
    pending = None
    try:
        for job in jobs:
            submitted = (job, pool.submit(encode, job))
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = submitted
            if stop is not None and stop.is_set():
                break
        if pending is not None:
            write(pending[0], pending[1].result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(cat: Catalog, todo: pa.Table, size: int, read: Callable[[pa.Table], object],
            stop: threading.Event | None) -> Iterable:
    """`read(slice)` of each `size`-row slice of the work list, the catalog released after each
    read; nothing more is read once `stop` is set."""
    for start in range(0, todo.num_rows, size):
        if stop is not None and stop.is_set():
            return
        job = read(todo.slice(start, size))
        cat.release()
        if job is not None:
            yield job


def _bar(progress, name: str, total: int, skipped: int, stop: threading.Event | None):
    """A per-batch progress bar whose rate (and so its ETA) counts only what this run encodes;
    none for a stage that will not start (stop already asked for)."""
    if progress is None or (stop is not None and stop.is_set()):
        return None
    return progress(total=total, initial=skipped, desc=f"precompute {name}", unit=f" {name}")


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def item_work(cat: Catalog, model_hash: str) -> tuple[int, pa.Table]:
    """(number of items, the items still to encode: item_id, content_hash), shortest text first,
    ties by id."""
    keys = cat.arrow(f"SELECT item_id, content_hash FROM items ORDER BY {ITEM_TEXT_LENGTH}, item_id")
    return keys.num_rows, E.missing(cat, model_hash, E.ITEM, keys)


def read_items(cat: Catalog, todo: pa.Table) -> tuple[pa.Table, list[str]]:
    """The catalog rows of a work-list slice, in its order, and their texts (an item deleted
    since the list was made is left out; an edited one comes with its new text and key)."""
    ids = todo["item_id"]
    rows = cat.items(ids.to_pylist())
    rows = rows.take(pc.drop_null(pc.index_in(ids, value_set=rows["item_id"].combine_chunks())))
    return rows, item_texts(rows)


def precompute_items(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
                     progress=None, stop: threading.Event | None = None, counts: dict | None = None) -> dict[str, int]:
    """Encode the items that have no current vector for `model_hash`; returns the counts (also
    filled into `counts` as they grow, so a caller keeps them when this raises)."""
    counts = {} if counts is None else counts
    counts.update(items_encoded=0, items_skipped=0, item_texts_encoded=0)
    total, todo = item_work(cat, model_hash)
    cat.release()
    counts["items_skipped"] = total - todo.num_rows
    bar = _bar(progress, "items", total, counts["items_skipped"], stop)
    sp = None

    def encode(job) -> Encoded:
        return encode_items(model, job[1], cfg, stop, bar.update if bar is not None else None)

    def write(job, done: Encoded) -> None:
        nonlocal sp
        (rows, texts), n = job, done.rows
        if n:
            cpe, cpe_prime = done.vectors
            sp = sp or E.ensure_space(cat, model_hash, E.ITEM, cpe.shape[1], cpe.shape[2])
            with cat.transaction():
                E.write_items(cat, sp, rows["item_id"].to_pylist()[:n], rows["content_hash"].to_pylist()[:n], cpe,
                              cpe_prime, dtype=cfg.dtype, run_id=run.run_id if run else None)
            counts["items_encoded"] += n
            counts["item_texts_encoded"] += len(set(texts[:n]))
            failpoints.hit("precompute.items.chunk_committed")
        cat.release()

    try:
        with cat.configured(**write_settings(cfg)):
            encode_ahead(_chunks(cat, todo, cfg.chunk_size, lambda part: read_items(cat, part), stop),
                         encode, write, stop)
    finally:
        _close(bar)
        cat.release()
    _note_left(counts, "items_left", todo.num_rows - counts["items_encoded"])
    return counts


def user_texts(cat: Catalog, user_ids: list[str]) -> dict[str, list[str]]:
    """user -> the texts of their history items, oldest first (unknown items dropped)."""
    histories = cat.histories(user_ids)
    needed = {i for h in histories.values() for i in h}
    items = cat.items(needed)
    text = dict(zip(items["item_id"].to_pylist(), item_texts(items)))
    return {u: [text[i] for i in histories.get(u, []) if i in text] for u in user_ids}


def user_work(cat: Catalog, model_hash: str) -> tuple[int, pa.Table]:
    """(number of users with a history hash, those still to encode: user_id, history_hash),
    shortest history first (positive interactions, as `Catalog.histories` counts them), ties by id."""
    keys = cat.arrow(
        "SELECT u.user_id, u.history_hash FROM users u LEFT JOIN interactions i"
        "   ON i.user_id = u.user_id AND (i.label IS NULL OR i.label = 1)"
        " WHERE u.history_hash IS NOT NULL GROUP BY u.user_id, u.history_hash"
        " ORDER BY count(i.item_id), u.user_id")
    return keys.num_rows, E.missing(cat, model_hash, E.USER, keys)


def precompute_users(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
                     progress=None, stop: threading.Event | None = None, counts: dict | None = None) -> dict[str, int]:
    """Encode the users that have no current vector for `model_hash` (see precompute_items)."""
    counts = {} if counts is None else counts
    counts.update(users_encoded=0, users_skipped=0, users_empty=0)
    total, todo = user_work(cat, model_hash)
    cat.release()
    counts["users_skipped"] = total - todo.num_rows
    bar = _bar(progress, "users", total, counts["users_skipped"], stop)
    sp = None

    def read(part: pa.Table):
        """(user ids, history hashes, history texts) of the slice's users with a history."""
        ids, hashes = part["user_id"].to_pylist(), part["history_hash"].to_pylist()
        texts = user_texts(cat, ids)
        keep = [k for k, u in enumerate(ids) if texts[u]]
        counts["users_empty"] += len(ids) - len(keep)
        if bar is not None:
            bar.update(len(ids) - len(keep))
        return ([ids[k] for k in keep], [hashes[k] for k in keep], [texts[ids[k]] for k in keep]) if keep else None

    def encode(job) -> Encoded:
        return encode_users(model, job[2], cfg, stop, bar.update if bar is not None else None)

    def write(job, done: Encoded) -> None:
        nonlocal sp
        (ids, hashes, _), n = job, done.rows
        if n:
            (upe,) = done.vectors
            sp = sp or E.ensure_space(cat, model_hash, E.USER, upe.shape[1], upe.shape[2])
            with cat.transaction():
                E.write_users(cat, sp, ids[:n], hashes[:n], upe, dtype=cfg.dtype, run_id=run.run_id if run else None)
            counts["users_encoded"] += n
            failpoints.hit("precompute.users.chunk_committed")
        cat.release()

    try:
        with cat.configured(**write_settings(cfg)):
            encode_ahead(_chunks(cat, todo, cfg.chunk_size, read, stop), encode, write, stop)
    finally:
        _close(bar)
        cat.release()
    _note_left(counts, "users_left", todo.num_rows - counts["users_encoded"] - counts["users_empty"])
    return counts


def _note_left(counts: dict, key: str, left: int) -> None:
    """Only a stopped stage has work left: say how much (absent otherwise, as in every finished run)."""
    if left > 0:
        counts[key] = left


def stopped_early(counts: dict) -> bool:
    """Whether a `precompute` call stopped (Ctrl-C/SIGTERM) with work left."""
    return any(key.endswith("_left") and n for key, n in counts.items())


def precompute(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
               progress=None, stop: threading.Event | None = None) -> dict[str, int]:
    """Items then users; returns (and adds to `run`, even when a stage raises) the counts.
    `progress`: a tqdm-like factory. `stop`: a stop request (see the module docstring); after
    it the counts hold what is left, and `stopped_early(counts)` is true."""
    from embsum.offline.popularity import record_weight

    from embsum.inference.encoding import resolve_dtype

    # 'auto' resolved once (issue 15): the encoders, the vectors' dtype column and the runs row agree
    cfg.dtype = resolve_dtype(cfg.dtype, model.device)
    if run is not None:
        run.args.update(dtype=cfg.dtype, device=str(model.device))
    record_weight(cat, model_hash, model.config.popularity_weight)  # scoring adds the model's prior
    counts: dict[str, int] = {}
    stages = [("items", precompute_items), ("users", precompute_users)]
    try:
        for name, job in stages:
            if getattr(cfg, name):
                part: dict[str, int] = {}
                try:
                    job(cat, model, model_hash, cfg, run, progress, stop, counts=part)
                finally:
                    counts.update(part)
                log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in part.items()))
    finally:
        if run is not None:
            for k, v in counts.items():
                run.add(k, v)
    return counts
