"""The Ray engine: `embsum precompute --engine ray` and `embsum score --engine ray`.

What runs where:
- the driver (the `embsum` process) is the catalog's only writer (DuckDB allows one). It reads
  the same work list the local engine computes (offline/precompute.py: items by text length,
  users by history length, only what has no current vector) and exports it as Parquet
  partitions of `partition_rows` rows (default `--chunk-size`) into the work folder;
- Ray Data maps the partitions over an actor pool (`ActorPoolStrategy`, one GPU per actor where
  the cluster has GPUs, CPU actors otherwise). Each actor loads the checkpoint (scoring: the
  index snapshot, `Retriever`) once, then per partition calls the same function as the local
  engine (`encode_items`/`encode_users` -> embsum.inference.encoding; `rank_users`) and writes
  one result shard named after its partition, to a temp name renamed when complete: a shard
  that exists is whole. Ray restarts a dead actor and retries its partitions (`max_retries`);
- the driver loads every shard into the catalog in one transaction through the same
  `embsum.index.embeddings` writes (scoring: `score_job` writes them with `write_results`),
  then removes the work folder.

A partition's name is a digest of what it holds and what its result depends on (ids, content
or history keys, model hash, dtype, batch size; scoring: the vectors, seen items, index
version and settings). A re-run after a kill exports the same names and skips every partition
whose shard is there; a changed catalog gives new names, never a stale shard. Partitions are
the local engine's chunks (same global order, same cut), and each is encoded exactly as the
local engine encodes a chunk, so the vectors agree with a local run's to float rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from embsum.index import embeddings as E
from embsum.index import failpoints
from embsum.index.catalog import Catalog, RunRecord
from embsum.offline.errors import UserError
from embsum.offline.indexing import JobError
from embsum.offline.job_configs import EngineConfig, PrecomputeConfig, ScoreConfig

log = logging.getLogger("embsum.ray")

# Users per scoring partition when --partition-rows is not given: a few FAISS batches' worth.
SCORE_PARTITION_ROWS = 1024


def default_work_dir(db_path: str | Path) -> str:
    """`catalog.duckdb` -> `catalog.ray/` beside it."""
    return str(Path(db_path).with_suffix(".ray").resolve())


# -- the work folder: partitions in, shards out ---------------------------------------------------
class WorkDir:
    """`<root>/<job>/in/<name>.parquet` (partitions) and `<job>/out/<name>.parquet` (shards), on
    a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://): actors reopen it by URI."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).resolve())

    def path(self, job: str, side: str, name: str = "") -> str:
        return f"{self.root}/{job}/{side}" + (f"/{name}.parquet" if name else "")

    def exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def write(self, path: str, table: pa.Table) -> None:
        """Temp name + rename: whoever sees `path` sees a whole file (a killed writer leaves only
        a temp file, removed by the next `prune`)."""
        import pyarrow.parquet as pq

        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, path)

    def read(self, path: str) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(path, filesystem=self.fs)

    def schema(self, path: str) -> pa.Schema:
        import pyarrow.parquet as pq

        return pq.read_schema(path, filesystem=self.fs)

    def prune(self, job: str, keep: set[str]) -> None:
        """Remove the job's files that are not partitions/shards named in `keep` (earlier runs'
        leftovers, temp files of killed writers)."""
        import pyarrow.fs as pafs

        for side in ("in", "out"):
            found = self.fs.get_file_info(pafs.FileSelector(self.path(job, side), allow_not_found=True))
            for info in found:
                if info.type == pafs.FileType.File and info.base_name.removesuffix(".parquet") not in keep:
                    self.fs.delete_file(info.path)

    def remove(self, job: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(f"{self.root}/{job}")


def digest(*parts) -> str:
    """A name for content: strings, lists of strings (or lists of lists), numpy arrays, dicts."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:24]


@dataclass
class Partition:
    """One unit of work: `kind` (items, users, score), its content-derived `name`, its rows and,
    for item partitions, how many distinct texts it holds."""

    kind: str
    name: str
    rows: int
    texts: int = 0


# -- the Ray session and the actor pool ----------------------------------------------------------
@contextlib.contextmanager
def ray_session(ecfg: EngineConfig) -> Iterator[None]:
    """Join `--address`, or start a local Ray with `--num-cpus` (all by default); a Ray already
    initialised in this process (a notebook, a test) is used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    verbose = logging.getLogger("embsum").isEnabledFor(logging.DEBUG)
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    kwargs = {"address": ecfg.address} if ecfg.address else {"num_cpus": ecfg.num_cpus}
    ray.init(**kwargs, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=verbose)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class Pool:
    size: int
    gpus: float


def pool_for(ecfg: EngineConfig, partitions: int, gpu_wanted: bool) -> Pool:
    """Actors and GPUs per actor: one GPU per actor where the cluster has GPUs (and the job can
    use one), else `cpus_per_actor` CPUs each; never more actors than partitions (each actor
    loads the model once, an idle one is wasted start-up)."""
    import ray

    have = ray.cluster_resources()
    gpus = ecfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if gpu_wanted and have.get("GPU", 0) >= 1 else 0.0
    if ecfg.actors:
        size = ecfg.actors
    elif gpus > 0:
        size = int(have.get("GPU", 0) // gpus)
    else:
        size = int(have.get("CPU", 1) // ecfg.cpus_per_actor)
    return Pool(max(1, min(size, partitions)), gpus)


def _unwrap(err: BaseException) -> BaseException:
    """The user error an actor raised (a bad checkpoint on a worker, an index swapped under the
    job) instead of Ray's wrapper, so the CLI prints its one line."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def run_partitions(parts: list[Partition], actor: type, actor_kwargs: dict, ecfg: EngineConfig, pool: Pool,
                   on_done: Callable[[dict], None], stop=None) -> None:
    """Map `actor` over the partitions on an actor pool; `on_done(row)` as each finishes (in
    completion order). Once `stop` is set no further result is awaited."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own bar, per partition
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    ds = ray.data.from_items([{"kind": p.kind, "name": p.name} for p in parts], override_num_blocks=len(parts))
    # Ray Data's own default is to restart a dead actor and retry its tasks forever: a partition
    # that kills every actor (out of memory) would never end. Ray 2.60 deprecates passing these
    # as remote args (no named parameter replaces them yet), hence the filter.
    retries = {"max_restarts": ecfg.max_retries, "max_task_retries": ecfg.max_retries}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(actor, batch_size=1, compute=ActorPoolStrategy(size=pool.size),
                            fn_constructor_kwargs={**actor_kwargs, "threads": ecfg.cpus_per_actor, "gpus": pool.gpus},
                            num_cpus=ecfg.cpus_per_actor, num_gpus=pool.gpus, **retries)
    try:
        for row in ds.iter_rows():
            on_done(row)
            failpoints.hit("ray.partition_done")
            if stop is not None and stop.is_set():
                break
    except Exception as err:  # Ray wraps what an actor raised
        cause = _unwrap(err)
        if cause is err:
            raise
        raise cause from None


class _Actor:
    """What every actor does first: quiet progress, `threads` torch threads, the work folder."""

    def __init__(self, work_uri: str, job: str, threads: int):
        import torch

        os.environ.setdefault("EMBSUM_NO_PROGRESS", "1")
        torch.set_num_threads(threads)
        self.work, self.job = WorkDir(work_uri), job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each partition of the batch whose shard is not written yet (a retried batch may have
        finished some before its actor died)."""
        for kind, name in zip(batch["kind"], batch["name"]):
            out = self.work.path(self.job, "out", str(name))
            if not self.work.exists(out):
                part = self.work.read(self.work.path(self.job, "in", str(name)))
                self.work.write(out, self.shard(str(kind), part))
        return {"kind": batch["kind"], "name": batch["name"], "extra": np.array([self.extra()] * len(batch["name"]))}

    def shard(self, kind: str, part: pa.Table) -> pa.Table:
        raise NotImplementedError

    def extra(self) -> str:
        return ""


class Encoder(_Actor):
    """An actor holding the checkpoint: partitions of items -> CPE, of users -> UPE, encoded as the
    local engine encodes one chunk (`encode_items`/`encode_users`)."""

    def __init__(self, checkpoint: str, model_hash: str, cfg: dict, work_uri: str, job: str, threads: int,
                 gpus: float):
        from embsum.offline.indexing import load_model

        super().__init__(work_uri, job, threads)
        self.cfg = PrecomputeConfig(**{**cfg, "device": "cuda" if gpus > 0 else "cpu"})
        self.model, got = load_model(checkpoint, self.cfg.device)
        if got != model_hash:
            raise JobError(f"checkpoint {checkpoint} on a Ray worker has hash {got[:12]}, the driver's "
                           f"{model_hash[:12]}: every node must see the same checkpoint")

    def shard(self, kind: str, part: pa.Table) -> pa.Table:
        from embsum.offline.precompute import encode_items, encode_users

        if kind == "items":
            cpe, cpe_prime = encode_items(self.model, part["text"].to_pylist(), self.cfg).vectors
            return pa.table({"item_id": part["item_id"], "content_hash": part["content_hash"],
                             "cpe": E.to_arrow(cpe), "cpe_prime": E.to_arrow(cpe_prime)})
        (upe,) = encode_users(self.model, part["history"].to_pylist(), self.cfg).vectors
        return pa.table({"user_id": part["user_id"], "history_hash": part["history_hash"], "upe": E.to_arrow(upe)})


class Scorer(_Actor):
    """An actor holding the index snapshot (`Retriever`): partitions of users -> their ranked
    rows, by the local engine's `rank_users`."""

    def __init__(self, root: str, model_hash: str, cfg: dict, run_id: str, work_uri: str, job: str, threads: int,
                 gpus: float, item_prior: dict | None = None):
        from embsum.index import faiss_index as F
        from embsum.offline.scoring import Retriever

        super().__init__(work_uri, job, threads)
        self.cfg, self.run_id, self.item_prior = ScoreConfig(**cfg), run_id, item_prior or {}
        self.retriever = Retriever(root, model_hash, self.cfg)
        if gpus > 0 and F.use_gpu(self.cfg.index_device):
            self.retriever.snap.index = F.to_gpu(self.retriever.snap.index)

    def shard(self, kind: str, part: pa.Table) -> pa.Table:
        from embsum.offline.scoring import Users, rank_users

        ids = part["user_id"].to_pylist()
        upe = E.from_arrow(part["upe"], *_vector_shape(part.schema, "upe"))
        users = Users(ids, upe, dict(zip(ids, part["seen"].to_pylist())), {}, self.item_prior)
        result = rank_users(self.retriever.snap, users, self.cfg, self.run_id)
        certified = str(result.counts["users_certified_exact"])
        return result.table.replace_schema_metadata({"users_certified_exact": certified})

    def extra(self) -> str:
        """The index version this actor ranks from: the driver checks every actor used its own."""
        return self.retriever.version


# -- precompute ----------------------------------------------------------------------------------
def _checked_hash(checkpoint: str) -> str:
    """The checkpoint's hash after the cheap checks (one line for a bad folder), without loading
    a model here: the actors load it."""
    from embsum.model.checkpoint import CheckpointError, check_checkpoint, checkpoint_hash

    try:
        check_checkpoint(checkpoint)
        return checkpoint_hash(checkpoint)
    except CheckpointError as err:
        raise JobError(str(err)) from None


def _export_items(cat: Catalog, work: WorkDir, job: str, cfg: PrecomputeConfig, size: int, salt: dict,
                  counts: dict) -> list[Partition]:
    """The items still to encode as partitions: `item_work`'s order cut every `size` rows."""
    from embsum.offline.precompute import item_work, read_items

    total, todo = item_work(cat, salt["model_hash"])
    counts.update(items_encoded=0, items_skipped=total - todo.num_rows, item_texts_encoded=0)
    parts = []
    for start in range(0, todo.num_rows, size):
        rows, texts = read_items(cat, todo.slice(start, size))
        if not texts:
            continue
        table = pa.table({"item_id": rows["item_id"], "content_hash": rows["content_hash"],
                          "text": pa.array(texts, pa.string())})
        name = "items-" + digest(salt, rows["item_id"].to_pylist(), rows["content_hash"].to_pylist())
        parts.append(_stage(work, job, Partition("items", name, table.num_rows, len(set(texts))), table))
    return parts


def _export_users(cat: Catalog, work: WorkDir, job: str, size: int, salt: dict, counts: dict) -> list[Partition]:
    """The users still to encode as partitions (`user_work`'s order; users with no history left
    out and counted, as the local engine does)."""
    from embsum.offline.precompute import user_texts, user_work

    total, todo = user_work(cat, salt["model_hash"])
    counts.update(users_encoded=0, users_skipped=total - todo.num_rows, users_empty=0)
    parts = []
    for start in range(0, todo.num_rows, size):
        part = todo.slice(start, size)
        ids, hashes = part["user_id"].to_pylist(), part["history_hash"].to_pylist()
        texts = user_texts(cat, ids)
        keep = [k for k, u in enumerate(ids) if texts[u]]
        counts["users_empty"] += len(ids) - len(keep)
        if not keep:
            continue
        table = pa.table({"user_id": pa.array([ids[k] for k in keep], pa.string()),
                          "history_hash": pa.array([hashes[k] for k in keep], pa.string()),
                          "history": pa.array([texts[ids[k]] for k in keep], pa.list_(pa.string()))})
        name = "users-" + digest(salt, table["user_id"].to_pylist(), table["history_hash"].to_pylist())
        parts.append(_stage(work, job, Partition("users", name, table.num_rows), table))
    return parts


def _stage(work: WorkDir, job: str, part: Partition, table: pa.Table) -> Partition:
    """Write a partition unless an earlier run left it (same name: same content)."""
    path = work.path(job, "in", part.name)
    if not work.exists(path):
        work.write(path, table)
    return part


def _vector_shape(schema: pa.Schema, column: str) -> tuple[int, int]:
    """[n, d] of a fixed-size-list vector column (`embeddings.to_arrow`)."""
    t = schema.field(column).type
    return t.list_size, t.value_type.list_size


def _load_shards(cat: Catalog, work: WorkDir, job: str, parts: list[Partition], model_hash: str,
                 cfg: PrecomputeConfig, run_id: str | None, counts: dict) -> None:
    """Every finished shard of `parts` into the catalog in one transaction, through the local
    engine's writes (a re-encoded row replaces its old one, so a shard loaded twice leaves one
    row per id)."""
    from embsum.offline.precompute import write_settings

    done = [p for p in parts if work.exists(work.path(job, "out", p.name))]
    spaces: dict[str, E.Space] = {}
    for p in done:  # registering a space is a transaction of its own: before the load's
        kind, vec = (E.ITEM, "cpe") if p.kind == "items" else (E.USER, "upe")
        if kind not in spaces:
            shape = _vector_shape(work.schema(work.path(job, "out", p.name)), vec)
            spaces[kind] = E.ensure_space(cat, model_hash, kind, *shape)
    if not done:
        return
    with cat.configured(**write_settings(cfg)), cat.transaction():
        for p in done:
            shard = work.read(work.path(job, "out", p.name))
            kind = E.ITEM if p.kind == "items" else E.USER
            sp = spaces[kind]
            vectors = {c: E.from_arrow(shard[c], sp.n, sp.d) for c in shard.column_names if c in ("cpe", "cpe_prime", "upe")}
            if kind == E.ITEM:
                E.write_items(cat, sp, shard["item_id"].to_pylist(), shard["content_hash"].to_pylist(),
                              vectors["cpe"], vectors["cpe_prime"], dtype=cfg.dtype, run_id=run_id)
                counts["items_encoded"] += shard.num_rows
                counts["item_texts_encoded"] += p.texts
            else:
                E.write_users(cat, sp, shard["user_id"].to_pylist(), shard["history_hash"].to_pylist(),
                              vectors["upe"], dtype=cfg.dtype, run_id=run_id)
                counts["users_encoded"] += shard.num_rows
        failpoints.hit("ray.shards_loading")
    cat.release()


def precompute(cat: Catalog, checkpoint: str, cfg: PrecomputeConfig, ecfg: EngineConfig,
               run: RunRecord | None = None, progress=None) -> tuple[str, dict[str, int]]:
    """`embsum precompute --engine ray`: (model hash, counts). Ctrl-C/SIGTERM stops waiting for
    partitions, loads the finished ones and leaves `*_left` counts (`stopped_early`)."""
    from embsum.offline.interrupts import graceful_stop
    from embsum.offline.popularity import record_weight

    from embsum.inference.encoding import resolve_dtype
    from embsum.model.checkpoint import check_checkpoint

    model_hash = _checked_hash(checkpoint)
    record_weight(cat, model_hash, check_checkpoint(checkpoint).config.popularity_weight)
    # 'auto' is resolved once, on the driver, so every shard and the vectors' dtype column agree:
    # bf16 where the driver's CPU (or its GPU) runs it natively. On a cluster whose workers differ
    # from the driver, pass --dtype explicitly.
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)
    if run is not None:
        run.args.update(dtype=cfg.dtype)
    work = WorkDir(ecfg.work_dir or default_work_dir(cat.path))
    job = f"precompute-{model_hash[:16]}"
    size = ecfg.partition_rows or cfg.chunk_size
    # What a shard's vectors depend on besides its rows: a different value is a different name.
    salt = {"model_hash": model_hash, "dtype": cfg.dtype, "batch_size": cfg.batch_size}
    counts: dict[str, int] = {}
    parts = (_export_items(cat, work, job, cfg, size, salt, counts) if cfg.items else []) + \
        (_export_users(cat, work, job, size, salt, counts) if cfg.users else [])
    cat.release()
    work.prune(job, {p.name for p in parts})
    todo = [p for p in parts if not work.exists(work.path(job, "out", p.name))]
    counts.update(partitions=len(parts), partitions_reused=len(parts) - len(todo))
    if todo:
        with ray_session(ecfg), graceful_stop("precompute") as stop:
            pool = pool_for(ecfg, len(todo), gpu_wanted=cfg.dtype != "int8")
            counts["actors"] = pool.size
            log.info("ray: %d partitions (%d reused) on %d actors (%g GPU each)", len(parts),
                     len(parts) - len(todo), pool.size, pool.gpus)
            bar = progress(total=sum(p.rows for p in parts), desc="precompute (ray)", unit=" rows") \
                if progress else None
            rows = {p.name: p.rows for p in parts}
            if bar is not None:
                bar.update(sum(p.rows for p in parts if p not in todo))
            actor_kwargs = {"checkpoint": str(Path(checkpoint).resolve()), "model_hash": model_hash,
                            "cfg": dict(cfg.__dict__), "work_uri": work.uri, "job": job}
            try:
                run_partitions(todo, Encoder, actor_kwargs, ecfg, pool,
                               lambda row: bar.update(rows[row["name"]]) if bar is not None else None, stop)
            finally:
                if bar is not None:
                    bar.close()
    _load_shards(cat, work, job, parts, model_hash, cfg, run.run_id if run else None, counts)
    _count_left(counts, parts)
    if not any(k.endswith("_left") for k in counts):
        work.remove(job)
    if run is not None:
        for k, v in counts.items():
            run.add(k, v)
    return model_hash, counts


def _count_left(counts: dict, parts: list[Partition]) -> None:
    """Rows of partitions not loaded (a stopped run): `items_left`/`users_left`, as the local
    engine reports them (absent when nothing is left)."""
    for kind, done_key in (("items", "items_encoded"), ("users", "users_encoded")):
        left = sum(p.rows for p in parts if p.kind == kind) - counts.get(done_key, 0)
        if left > 0:
            counts[f"{kind}_left"] = left


# -- scoring ----------------------------------------------------------------------------------------
def ranker(ecfg: EngineConfig, db_path: str | Path) -> Callable:
    """The `rank` hook of `embsum.offline.scoring.score_job` for retrieval on Ray: users cut
    into partitions, each ranked by a `Scorer` actor; the driver gathers the shards, and
    `score_job` writes them as it writes the local engine's."""

    def rank(root: Path, model_hash: str, who, cfg: ScoreConfig, run_id: str):
        return _rank(Path(root).resolve(), model_hash, who, cfg, run_id, ecfg, db_path)

    return rank


def _rank(root: Path, model_hash: str, who, cfg: ScoreConfig, run_id: str, ecfg: EngineConfig, db_path):
    from embsum.index import snapshot as S
    from embsum.offline.scoring import Scored, record_reject

    version, manifest = S.read_manifest(root)
    S.check_model(root, manifest, model_hash)
    work = WorkDir(ecfg.work_dir or default_work_dir(db_path))
    job = f"score-{model_hash[:16]}"
    size = ecfg.partition_rows or SCORE_PARTITION_ROWS
    salt = {"model_hash": model_hash, "version": version, "cfg": cfg.__dict__,
            "prior": digest(sorted(who.item_prior.items()))}  # tonight's counts change the scores
    parts = []
    for start in range(0, len(who.ids), size):
        ids = who.ids[start:start + size]
        upe = np.ascontiguousarray(who.upe[start:start + len(ids)], dtype=np.float32)
        seen = [list(who.seen.get(u, [])) for u in ids]
        table = pa.table({"user_id": pa.array(ids, pa.string()), "upe": E.to_arrow(upe),
                          "seen": pa.array(seen, pa.list_(pa.string()))})
        parts.append(_stage(work, job, Partition("score", "score-" + digest(salt, ids, upe, seen), len(ids)), table))
    work.prune(job, {p.name for p in parts})
    todo = [p for p in parts if not work.exists(work.path(job, "out", p.name))]
    versions: set[str] = set()
    if todo:
        with ray_session(ecfg):
            pool = pool_for(ecfg, len(todo), gpu_wanted=cfg.index_device != "cpu")
            actor_kwargs = {"root": str(root), "model_hash": model_hash, "cfg": dict(cfg.__dict__),
                            "run_id": run_id, "work_uri": work.uri, "job": job, "item_prior": who.item_prior}
            run_partitions(todo, Scorer, actor_kwargs, ecfg, pool, lambda row: versions.add(row["extra"]))
    if versions - {version}:
        raise JobError(f"the index changed while scoring (version {version} -> {', '.join(versions - {version})}):"
                       " run the same command again")
    rejects, counts = [], {"users_read": len(who.ids) + len(who.why)}
    for u, why in who.why.items():
        record_reject(rejects, counts, "users", None, u, why)
    shards = [work.read(work.path(job, "out", p.name)) for p in parts]
    certified = sum(int(s.schema.metadata[b"users_certified_exact"]) for s in shards)
    # a shard reused from a killed run carries that run's id: the rows are this run's output
    table = pa.concat_tables([s.replace_schema_metadata(None) for s in shards]) if shards else None
    if table is None:
        from embsum.offline.scoring import results_table

        table = results_table(run_id, model_hash, version, [], [], np.zeros(0, np.float32), np.zeros(0, np.int32))
    table = table.set_column(table.schema.get_field_index("run_id"), "run_id",
                             pa.array([run_id] * table.num_rows, pa.string()))
    counts.update(users_scored=len(who.ids), users_certified_exact=certified, rows_out=table.num_rows,
                  index_version=version, partitions=len(parts), partitions_reused=len(parts) - len(todo))
    work.remove(job)
    return Scored(table, rejects, counts, list(who.ids), model_hash, version)
