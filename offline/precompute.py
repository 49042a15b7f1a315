"""The precompute job: items -> CPE, users -> UPE, from a checkpoint into the catalog.

Streaming and resumable by construction:
- only items with no vector for (item_id, model hash, content hash) are read, so a re-run
  after a kill skips every committed chunk, and a nightly run encodes only new or edited items
  (users: new or changed history hash);
- items come in chunks of `chunk_size` in one global order by text length
  (`E.missing_items_by_length`), so memory holds one chunk whatever the catalog's size and a
  chunk's batches are nearly free of padding; a nightly run's scattered edits are one chunk;
- each chunk's distinct texts are encoded once (`embsum.encoding` sorts them by token length
  and runs under inference mode), then the chunk is written in its own transaction, while the
  next chunk encodes on a worker thread (`encode_ahead`).
Chunk composition depends only on the catalog and what is already stored: chunks are
consecutive slices of the missing rows in that fixed order and are committed whole, so a
resumed run encodes exactly the chunks an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.compute as pc

from index import embeddings as E
from index import failpoints
from index.catalog import Catalog, RunRecord
from offline.job_configs import PrecomputeConfig
from offline.texts import item_text

log = logging.getLogger("embsum.precompute")


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts and, for every input, the index of its text among them."""
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
    return list(first), inverse


def encode_items(model, texts: list[str], cfg: PrecomputeConfig) -> tuple[np.ndarray, np.ndarray]:
    """CPE and CPE' of `texts`, each distinct text encoded once."""
    from embsum.encoding import encode_item_texts

    uniq, inverse = _distinct(texts)
    cpe, cpe_prime = encode_item_texts(model, uniq, batch_size=cfg.batch_size, device=cfg.device,
                                       dtype=cfg.dtype, progress=False)
    return cpe[inverse], cpe_prime[inverse]


def limit_db_memory(cat: Catalog, cfg: PrecomputeConfig) -> None:
    """Cap DuckDB's buffer cache so peak memory stays flat however large the catalog grows."""
    if cfg.db_memory:
        cat.con.execute(f"SET memory_limit = '{cfg.db_memory}'")


def encode_ahead(jobs: Iterable, encode: Callable, write: Callable) -> None:
    """`write(job, encode(job))` for every job, in order, with job k+1 encoding on a worker
    thread while job k is written here.

    torch releases the GIL in its kernels, so reading the next chunk and the DuckDB write and
    commit of this one (Arrow conversion, WAL fsync) overlap the next chunk's forward passes. At
    most two chunks' vectors are held, and commits stay in chunk order, so memory stays flat and
    a resumed run sees exactly the committed prefix an unpipelined run would."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="embsum-encode")
    pending = None
    try:
        for job in jobs:
            submitted = (job, pool.submit(encode, job))
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = submitted
        if pending is not None:
            write(pending[0], pending[1].result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def precompute_items(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
                     bar=None) -> dict[str, int]:
    limit_db_memory(cat, cfg)
    counts = {"items_encoded": 0, "items_skipped": 0, "item_texts_encoded": 0}
    sp = None

    todo_total, chunks = E.missing_items_by_length(cat, model_hash, cfg.chunk_size)
    counts["items_skipped"] = cat.count("items") - todo_total
    if bar is not None:
        bar.update(counts["items_skipped"])

    def jobs():
        for todo in chunks:
            yield todo, [item_text(t, d) for t, d in zip(todo["title"].to_pylist(), todo["description"].to_pylist())]

    def write(job, vectors):
        nonlocal sp
        (todo, texts), (cpe, cpe_prime) = job, vectors
        sp = sp or E.ensure_space(cat, model_hash, E.ITEM, cpe.shape[1], cpe.shape[2])
        with cat.transaction():
            E.write_items(cat, sp, todo["item_id"].to_pylist(), todo["content_hash"].to_pylist(), cpe,
                          cpe_prime, dtype=cfg.dtype, run_id=run.run_id if run else None)
        counts["items_encoded"] += todo.num_rows
        counts["item_texts_encoded"] += len(set(texts))
        failpoints.hit("precompute.items.chunk_committed")
        if bar is not None:
            bar.update(todo.num_rows)

    with E.bulk_writes(cat):
        encode_ahead(jobs(), lambda job: encode_items(model, job[1], cfg), write)
    return counts


def _user_texts(cat: Catalog, user_ids: list[str]) -> dict[str, list[str]]:
    """user -> the texts of their history items, oldest first (unknown items dropped)."""
    histories = cat.histories(user_ids)
    needed = {i for h in histories.values() for i in h}
    items = cat.items(needed)
    text = {i: item_text(t, d) for i, t, d in zip(items["item_id"].to_pylist(), items["title"].to_pylist(),
                                                     items["description"].to_pylist())}
    return {u: [text[i] for i in histories.get(u, []) if i in text] for u in user_ids}


def precompute_users(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
                     bar=None) -> dict[str, int]:
    from embsum.encoding import encode_user_histories

    counts = {"users_encoded": 0, "users_skipped": 0, "users_empty": 0}
    limit_db_memory(cat, cfg)
    users = cat.users()
    users = users.filter(pc.is_valid(users["history_hash"]))
    todo = E.missing(cat, model_hash, E.USER, users)
    counts["users_skipped"] = users.num_rows - todo.num_rows
    if bar is not None:
        bar.update(counts["users_skipped"])
    sp = None

    def jobs():
        """(user ids, history hashes, history texts) of each chunk's users with a history."""
        for start in range(0, todo.num_rows, cfg.chunk_size):
            chunk = todo.slice(start, cfg.chunk_size)
            ids, hashes = chunk["user_id"].to_pylist(), chunk["history_hash"].to_pylist()
            texts = _user_texts(cat, ids)
            keep = [k for k, u in enumerate(ids) if texts[u]]
            counts["users_empty"] += len(ids) - len(keep)
            if bar is not None:
                bar.update(len(ids) - len(keep))
            if keep:
                yield [ids[k] for k in keep], [hashes[k] for k in keep], [texts[ids[k]] for k in keep]

    def encode(job):
        return encode_user_histories(model, job[2], batch_size=cfg.batch_size, device=cfg.device,
                                     dtype=cfg.dtype, progress=False)

    def write(job, upe):
        nonlocal sp
        ids, hashes, _ = job
        sp = sp or E.ensure_space(cat, model_hash, E.USER, upe.shape[1], upe.shape[2])
        with cat.transaction():
            E.write_users(cat, sp, ids, hashes, upe, dtype=cfg.dtype, run_id=run.run_id if run else None)
        counts["users_encoded"] += len(ids)
        failpoints.hit("precompute.users.chunk_committed")
        if bar is not None:
            bar.update(len(ids))

    with E.bulk_writes(cat):
        encode_ahead(jobs(), encode, write)
    return counts


def precompute(cat: Catalog, model, model_hash: str, cfg: PrecomputeConfig, run: RunRecord | None = None,
               progress=None) -> dict[str, int]:
    """Items then users; returns (and adds to `run`) the counts. `progress`: a tqdm-like factory."""
    counts: dict[str, int] = {}
    stages = [("items", precompute_items, lambda: cat.count("items")),
              ("users", precompute_users, lambda: cat.count("users"))]
    for name, job, total in stages:
        if not getattr(cfg, name):
            continue
        bar = progress(total=total(), desc=f"precompute {name}", unit=f" {name}") if progress else None
        try:
            part = job(cat, model, model_hash, cfg, run, bar)
        finally:
            if bar is not None:
                bar.close()
        counts.update(part)
        log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in part.items()))
    if run is not None:
        for k, v in counts.items():
            run.add(k, v)
    return counts
