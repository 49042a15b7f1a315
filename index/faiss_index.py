"""FAISS first-stage retrieval over the stored CPE vectors (plain functions over numpy, in the
style of faiss.contrib), plus building and incrementally updating on-disk snapshots.

Two ways to put an item in the index (`mode`):
- "multi": all n CPE vectors, FAISS id = row * n + code, mapped back to the row by `// n`.
  A poly-score is a convex combination of the dot products gamma_i . lambda_j (softmax
  weights), so it never exceeds the best of them: searching each UPE vector over every CPE
  vector gives an upper bound for every unretrieved item, which the re-rank uses to certify
  an exact top-N (offline/scoring.py).
- "pooled": one vector per item, the mean of its n CPE vectors, id = row. n times smaller and
  faster, no such bound.
The factory string follows the size: exact ("IDMap2,Flat") below `flat_threshold` vectors,
IVF above (nlist ~ 4 sqrt(N), a power of two). Inner product throughout (the score is a dot).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import failpoints
from .index_config import MODES, IndexConfig  # noqa: F401  (re-exported)
from .snapshot import (
    BASE_FILES,
    INDEX_FILE,
    ITEMS_FILE,
    OVERLAY_FILES,
    OVERLAY_ROWS,
    VECTOR_FILES,
    Snapshot,
    Staging,
    save_array,
    write_items_table,
)

log = logging.getLogger(__name__)


def faiss_module():
    """`import faiss`, without its loader's INFO lines about which CPU build it tried."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


# -- primitives ----------------------------------------------------------------------------------
def choose_factory(n_vectors: int, flat_threshold: int = 1_000_000) -> str:
    if n_vectors < flat_threshold:
        return "IDMap2,Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_vectors)))
    return f"IVF{min(max(nlist, 64), 65536)},Flat"


def is_ivf(factory: str) -> bool:
    return factory.startswith("IVF") or ",IVF" in factory


def default_nprobe(factory: str) -> int:
    if not is_ivf(factory):
        return 1
    nlist = int("".join(ch for ch in factory.split("IVF", 1)[1].split(",")[0] if ch.isdigit()) or 1)
    return min(nlist, max(16, nlist // 8))


def item_vectors(cpe: np.ndarray, mode: str) -> np.ndarray:
    """[N, n, d] -> the vectors FAISS holds: [N*n, d] (multi) or [N, d] (pooled)."""
    if mode == "pooled":
        return np.ascontiguousarray(cpe.mean(axis=1), dtype=np.float32)
    return np.ascontiguousarray(cpe.reshape(-1, cpe.shape[-1]), dtype=np.float32)


def vector_ids(rows: np.ndarray, n: int, mode: str) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if mode == "pooled":
        return rows
    return (rows[:, None] * n + np.arange(n, dtype=np.int64)[None, :]).reshape(-1)


def rows_of(ids: np.ndarray, n: int, mode: str) -> np.ndarray:
    """FAISS ids -> item rows (-1, FAISS's "no result", stays -1)."""
    ids = np.asarray(ids, dtype=np.int64)
    if mode == "pooled":
        return ids
    return np.where(ids >= 0, ids // n, -1)


def new_index(d: int, factory: str):
    faiss = faiss_module()

    return faiss.index_factory(int(d), factory, faiss.METRIC_INNER_PRODUCT)


def set_nprobe(index, nprobe: int) -> None:
    faiss = faiss_module()

    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:
        pass  # not an IVF index


# faiss's GPU k-selection handles k <= 2048; a wider search (a rare certification round) runs on
# a CPU copy of the index.
GPU_MAX_K = 2048
_said_no_gpu: set[str] = set()


def gpu_count() -> int:
    """GPUs faiss can use: 0 for the faiss-cpu build or where no GPU is visible."""
    faiss = faiss_module()

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(device: str) -> bool:
    """Whether FAISS runs on GPUs for `device` (auto|cpu|gpu, see index_config.FAISS_DEVICES).
    Without one the CPU path runs and says so once per process: at WARNING when the user asked
    for `gpu`, at DEBUG for `auto` (the default on every CPU machine: not news)."""
    if device == "cpu":
        return False
    if gpu_count() > 0:
        return True
    if device not in _said_no_gpu:
        _said_no_gpu.add(device)
        why = "no GPU visible" if hasattr(faiss_module(), "StandardGpuResources") else \
            "this faiss is the CPU build (install the `gpu` extra: FAISS_EXTRA=gpu ./install.sh)"
        log.log(logging.WARNING if device == "gpu" else logging.DEBUG, "FAISS runs on the CPU: %s", why)
    return False


def to_gpu(index):
    """The index on every GPU (sharded across several, so each holds 1/n of the vectors); the CPU
    index itself when faiss has no GPU (index_cpu_to_all_gpus would then return an index whose
    `add` fails) or this index type cannot move."""
    faiss = faiss_module()

    n_gpus = gpu_count()
    if n_gpus <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = n_gpus > 1
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except (RuntimeError, AttributeError) as err:
        log.warning("FAISS index stays on CPU: %s", err)
        return index


def on_gpu(index) -> bool:
    """Whether `index` (or the index an IDMap wraps) lives on GPUs."""
    if gpu_count() <= 0:
        return False
    faiss = faiss_module()
    inner = getattr(index, "index", None)
    kinds = [type(index).__name__] + ([type(faiss.downcast_index(inner)).__name__] if inner is not None else [])
    return any(k.startswith(("Gpu", "IndexShards")) or k == "IndexReplicas" for k in kinds)


def to_cpu(index):
    """A CPU copy of a GPU index (what is written to disk); a CPU index unchanged."""
    faiss = faiss_module()

    if hasattr(faiss, "index_gpu_to_cpu") and on_gpu(index):
        return faiss.index_gpu_to_cpu(index)
    return index


def add(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def remove(index, ids: np.ndarray) -> int:
    faiss = faiss_module()

    if not len(ids):
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores [Q, k], ids [Q, k]); missing results are id -1."""
    k = max(1, min(int(k), int(index.ntotal))) if index.ntotal else 1
    if k > GPU_MAX_K and on_gpu(index):
        index = to_cpu(index)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def apply_overlay(index, n: int, mode: str, live: np.ndarray, base_rows: int, overlay_rows: np.ndarray,
                  overlay_cpe: np.ndarray) -> None:
    """Turn the full build's index into an updated version's, in place: the vectors of base rows
    that were replaced (now in the overlay) or removed (not live) leave, the overlay's live rows
    come in. Same contents as removing and adding ids at each update, in one pass."""
    stale = ~np.asarray(live[:base_rows], dtype=bool)
    stale[overlay_rows[overlay_rows < base_rows]] = True
    remove(index, vector_ids(np.flatnonzero(stale), n, mode))
    keep = np.asarray(live, dtype=bool)[overlay_rows]
    add(index, item_vectors(np.asarray(overlay_cpe[np.flatnonzero(keep)]), mode), vector_ids(overlay_rows[keep], n, mode))


def contents(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) held by an IDMap2 or IVF index, sorted by id: compares two indexes."""
    faiss = faiss_module()

    if isinstance(index, faiss.IndexIDMap2) or hasattr(index, "id_map"):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vecs = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    else:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        invlists = ivf.invlists
        ids = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
                              for lst in range(ivf.nlist)]) if ivf.ntotal else np.zeros(0, np.int64)
        vecs = np.stack([ivf.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, ivf.d), np.float32)
    order = np.argsort(ids)
    return ids[order], vecs[order]


def by_item(snap) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """item_id -> (content_hash, its cpe row, the FAISS vectors held for it): what a snapshot
    means, independent of row numbers and version history (compares two snapshots)."""
    ids, vecs = contents(snap.index)
    n = snap.manifest["n"]
    rows = rows_of(ids, n, snap.mode)
    order = np.argsort(rows, kind="stable")
    rows, vecs = rows[order], vecs[order]
    names, hashes = snap.item_ids(), snap.items.column("content_hash").to_pylist()
    out = {}
    for r in snap.live_rows():
        lo, hi = np.searchsorted(rows, r), np.searchsorted(rows, r, side="right")
        out[names[r]] = (hashes[r], np.asarray(snap.cpe[r]), vecs[lo:hi])
    if sum(len(v[2]) for v in out.values()) != len(ids):
        raise ValueError("the index holds vectors of rows that are not live")
    return out


# -- snapshots: full build and incremental update -----------------------------------------------
@dataclass
class Blocks:
    """Where a build reads the current item vectors: `iterate()` yields embsum.index.embeddings.Block
    chunks in id order (`count` of them in all); `fetch(ids)` one Block for given ids
    (incremental update)."""

    n: int
    d: int
    count: int
    iterate: Callable[[], Iterable]
    fetch: Callable[[list[str]], object]


def _items_table(ids, hashes, live) -> pa.Table:
    return pa.table({"item_id": pa.array(ids, pa.string()), "content_hash": pa.array(hashes, pa.string()),
                     "live": pa.array(live, pa.bool_())})


def _train_and_fill(index, cpe: np.ndarray, rows: np.ndarray, cfg: IndexConfig, n: int) -> None:
    """Train (IVF) on a random sample of the memory-mapped vectors, then add them chunk by chunk."""
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        per_item = 1 if cfg.mode == "pooled" else n
        take = min(len(rows), max(1, cfg.train_size // per_item))
        sample = np.sort(rng.choice(rows, take, replace=False))
        index.train(item_vectors(np.asarray(cpe[sample]), cfg.mode))
    for start in range(0, len(rows), cfg.chunk_size):
        part = rows[start:start + cfg.chunk_size]
        add(index, item_vectors(np.asarray(cpe[part]), cfg.mode), vector_ids(part, n, cfg.mode))


def build(root, model_hash: str, blocks: Blocks, cfg: IndexConfig, run_id: str | None = None) -> tuple[str, dict]:
    """A new version from every current item vector of the model; returns (version, manifest)."""
    from numpy.lib.format import open_memmap

    if blocks.count < 1:
        raise ValueError(f"no item vectors for model {model_hash[:12]}: run `embsum precompute` first")
    t0 = time.perf_counter()
    staging = Staging(root, model_hash)
    try:
        # Pass 1: stream the catalog into the version's .npy files (memory stays one chunk).
        total = blocks.count
        ids, hashes = [], []
        arrays = [open_memmap(staging.file(f), mode="w+", dtype=np.float32, shape=(total, blocks.n, blocks.d))
                  for f in VECTOR_FILES]
        for blk in blocks.iterate():
            if len(ids) + len(blk) > total:
                raise RuntimeError("the catalog's item vectors changed while the index was being built")
            for arr, col in zip(arrays, ("cpe", "cpe_prime")):
                arr[len(ids):len(ids) + len(blk)] = blk.vectors[col]
            ids += blk.ids
            hashes += blk.hashes
        if len(ids) != total:
            raise RuntimeError("the catalog's item vectors changed while the index was being built")
        for arr in arrays:
            arr.flush()
        del arrays
        failpoints.hit("index.build.vectors_written")
        n_vectors = total * (1 if cfg.mode == "pooled" else blocks.n)
        factory = cfg.factory or choose_factory(n_vectors, cfg.flat_threshold)
        index = new_index(blocks.d, factory)
        if use_gpu(cfg.device):
            index = to_gpu(index)
        cpe = np.load(staging.file(VECTOR_FILES[0]), mmap_mode="r")
        _train_and_fill(index, cpe, np.arange(total, dtype=np.int64), cfg, blocks.n)
        del cpe
        index = to_cpu(index)
        nprobe = cfg.nprobe or default_nprobe(factory)
        set_nprobe(index, nprobe)
        manifest = {
            "mode": cfg.mode, "factory": factory, "metric": "inner_product", "nprobe": nprobe,
            "n": blocks.n, "d": blocks.d, "n_items": total, "n_rows": total,
            "build": "full", "changed_since_build": 0, "items_at_build": total,
        }
        version = _commit(staging, index, _items_table(ids, hashes, [True] * total), manifest, t0, run_id, cfg)
    except BaseException:
        staging.abort()
        raise
    log.info("index %s: %d items, %d vectors, %s (full build, %.1fs)", version, total, manifest["n_vectors"],
             factory, manifest["build_seconds"])
    return version, manifest


@dataclass
class Diff:
    """What changed between a snapshot and the catalog's current item vectors."""

    new: list[str]
    changed: list[str]
    removed: list[str]

    @property
    def size(self) -> int:
        return len(self.new) + len(self.changed) + len(self.removed)


def diff(snap: Snapshot, current: pa.Table) -> Diff:
    """`current`: item_id, content_hash of every item vector that should be in the index."""
    held = {i: h for i, h, live in zip(snap.items.column("item_id").to_pylist(),
                                        snap.items.column("content_hash").to_pylist(),
                                        snap.items.column("live").to_pylist()) if live}
    want = dict(zip(current.column("item_id").to_pylist(), current.column("content_hash").to_pylist()))
    new = [i for i in want if i not in held]
    changed = [i for i, h in want.items() if i in held and held[i] != h]
    removed = [i for i in held if i not in want]
    return Diff(new, changed, removed)


def needs_rebuild(snap: Snapshot, d: Diff, n_current: int, cfg: IndexConfig) -> str | None:
    """Why an incremental update would be the wrong call (None: update in place)."""
    m = snap.manifest
    if m.get("mode") != cfg.mode:
        return f"mode {m.get('mode')} -> {cfg.mode}"
    per_item = 1 if cfg.mode == "pooled" else m["n"]
    wanted = cfg.factory or choose_factory(n_current * per_item, cfg.flat_threshold)
    if wanted != m["factory"] and (cfg.factory or is_ivf(wanted) != is_ivf(m["factory"])):
        return f"factory {m['factory']} -> {wanted}"
    drift = (m.get("changed_since_build", 0) + d.size) / max(1, m.get("items_at_build", 1))
    if drift > cfg.max_drift:
        return f"drift {drift:.1%} > {cfg.max_drift:.0%} since the last full build"
    return None


def update(root, snap: Snapshot, d: Diff, blocks: Blocks, cfg: IndexConfig,
           run_id: str | None = None) -> tuple[str, dict]:
    """A new version = `snap` with changed items' vectors replaced, new items appended and
    removed items dropped (their rows stay as tombstones until the next full build).

    Writes only what changed: the full build's index and vector files are linked, not copied,
    and the overlay (every row replaced or added since that build) is rewritten; `load` applies
    it. The cost is the size of the drift since the last build, not of the catalog."""
    t0 = time.perf_counter()
    m = snap.manifest
    n, mode = m["n"], m["mode"]
    ids = snap.items.column("item_id").to_pylist()
    hashes = snap.items.column("content_hash").to_pylist()
    live = snap.items.column("live").to_pylist()
    row_of = snap.row_of()
    fresh = blocks.fetch(d.changed + d.new)
    pos = {item: i for i, item in enumerate(fresh.ids)}
    missing = [i for i in d.changed + d.new if i not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} item vectors vanished during the index update (e.g. {missing[0]})")
    for i in d.removed:
        live[row_of[i]] = False
    new_rows = np.arange(len(ids), len(ids) + len(d.new), dtype=np.int64)
    ids += d.new
    hashes += [None] * len(d.new)
    live += [True] * len(d.new)
    put_rows = np.concatenate([np.array([row_of[i] for i in d.changed], dtype=np.int64), new_rows])
    take = np.array([pos[i] for i in d.changed + d.new], dtype=np.int64)
    for r, t in zip(put_rows, take):
        hashes[r] = fresh.hashes[t]
    # The overlay so far, less rows replaced now or whose item left, then this update's rows.
    old_rows = snap.overlay_rows
    dropped = np.concatenate([put_rows, np.array([row_of[i] for i in d.removed], dtype=np.int64)])
    kept = np.flatnonzero(~np.isin(old_rows, dropped))
    rows = np.concatenate([old_rows[kept], put_rows])
    order = np.argsort(rows, kind="stable")
    vdir = Path(root) / snap.version
    staging = Staging(root, snap.model_hash)
    try:
        for name in BASE_FILES:
            staging.link(vdir / name)
        save_array(staging.file(OVERLAY_ROWS), rows[order], dtype=np.int64)
        for f, col, old in zip(OVERLAY_FILES, ("cpe", "cpe_prime"), (snap.cpe, snap.cpe_prime)):
            previous = np.asarray(old.overlay[kept]) if len(kept) else np.zeros((0, n, m["d"]), np.float32)
            save_array(staging.file(f), np.concatenate([previous, fresh.vectors[col][take]])[order])
        failpoints.hit("index.update.vectors_written")
        n_items = int(sum(live))
        manifest = {
            **{k: m[k] for k in ("mode", "factory", "metric", "nprobe", "n", "d", "items_at_build")},
            "n_items": n_items, "n_rows": len(ids), "build": "update", "base_version": snap.version,
            "full_build_version": m.get("full_build_version", snap.version),
            "changed_since_build": int(m.get("changed_since_build", 0) + d.size), "overlay_rows": len(rows),
            "added": len(d.new), "replaced": len(d.changed), "removed": len(d.removed),
            "n_vectors": n_items * (1 if mode == "pooled" else n),
        }
        version = _commit(staging, None, _items_table(ids, hashes, live), manifest, t0, run_id, cfg)
    except BaseException:
        staging.abort()
        raise
    log.info("index %s: +%d new, %d replaced, -%d removed (update of %s, overlay of %d rows, %.1fs)", version,
             len(d.new), len(d.changed), len(d.removed), snap.version, len(rows), manifest["build_seconds"])
    return version, manifest


def _commit(staging: Staging, index, items: pa.Table, manifest: dict, t0: float, run_id: str | None,
            cfg: IndexConfig) -> str:
    """Write the index (None: already linked in) and the row table beside the vectors, complete
    the manifest, swap in."""
    if index is not None:
        _write_index(index, staging)
        manifest["n_vectors"] = int(index.ntotal)
    write_items_table(staging.file(ITEMS_FILE), items)
    manifest.update(build_seconds=round(time.perf_counter() - t0, 3), built_at=_stamp(), run_id=run_id,
                    faiss_version=_faiss_version())
    return staging.commit(manifest, keep=cfg.keep)


def _write_index(index, staging: Staging) -> None:
    faiss = faiss_module()

    faiss.write_index(to_cpu(index), str(staging.file(INDEX_FILE)))


def _stamp() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _faiss_version() -> str:
    faiss = faiss_module()

    return getattr(faiss, "__version__", "unknown")
