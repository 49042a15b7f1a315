"""The index step shared by `embsum index` and `embsum refresh`, and the paths/model lookups
the embedding jobs share.

`sync_index` brings the live FAISS snapshot in line with the catalog's current item vectors of
one model: nothing when nothing changed (so a second refresh writes no new version), an
incremental update (remove/add ids) for small changes, a full build when there is no index yet,
it belongs to another model, or drift/size call for it (faiss_index.needs_rebuild).
"""

from __future__ import annotations

import logging
from pathlib import Path

from embsum.index import embeddings as E
from embsum.index import faiss_index as F
from embsum.index import snapshot as S
from embsum.index.catalog import Catalog, RunRecord
from embsum.offline.errors import UserError

log = logging.getLogger("embsum.index")


class JobError(UserError):
    """A condition the user must fix (one clear line, no traceback)."""


def default_index_dir(db_path: str | Path) -> Path:
    """`catalog.duckdb` -> `catalog.index/` beside it."""
    return Path(db_path).with_suffix(".index")


def model_hashes(cat: Catalog, kind: str = E.ITEM) -> list[str]:
    if "embedding_spaces" not in cat.tables():
        return []
    rows = cat.con.execute("SELECT model_hash FROM embedding_spaces WHERE kind = ? ORDER BY created_at",
                           [kind]).fetchall()
    return [r[0] for r in rows]


def resolve_model_hash(cat: Catalog | None, checkpoint: str | None, model_hash: str | None) -> str:
    """The model whose vectors a job uses: --model-hash, else the checkpoint's hash file, else the
    catalog's only model (several: the user must choose)."""
    if model_hash:
        return model_hash
    if checkpoint:
        from embsum.model.checkpoint import CheckpointError, checkpoint_hash

        try:
            return checkpoint_hash(checkpoint)
        except CheckpointError as err:
            raise JobError(str(err)) from None
    known = model_hashes(cat) if cat is not None else []
    if len(known) == 1:
        return known[0]
    if not known:
        raise JobError("no item embeddings in the catalog: run `embsum precompute --checkpoint DIR` first")
    raise JobError(f"the catalog holds vectors of {len(known)} models ({', '.join(h[:12] for h in known)}):"
                   " choose one with --checkpoint or --model-hash")


def init_if_missing(checkpoint: str | Path) -> None:
    """An untrained checkpoint from the packaged backbone where none exists yet (jobs must run
    before any training)."""
    if Path(checkpoint).exists():
        return
    from embsum.config import ModelConfig
    from embsum.model.checkpoint import init_checkpoint

    digest = init_checkpoint(ModelConfig(), checkpoint)
    log.info("initialised untrained checkpoint %s (hash %s)", checkpoint, digest)


def load_model(checkpoint: str, device: str):
    """(model, hash) of any embsum checkpoint (init, SFT, aligned) with checkpoint problems as
    JobError: a bad directory fails in one line before torch picks a device or a model is built."""
    from embsum.model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint

    try:
        check_checkpoint(checkpoint)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_checkpoint(checkpoint, device)
    except CheckpointError as err:
        raise JobError(str(err)) from None


def sync_index(cat: Catalog, root: str | Path, model_hash: str, cfg: F.IndexConfig,
               run: RunRecord | None = None, rebuild: bool = False) -> dict:
    """Make the live snapshot under `root` hold exactly the model's current item vectors."""
    sp = E.space(cat, model_hash, E.ITEM)
    current = E.keys(cat, model_hash, E.ITEM)
    if sp is None or current.num_rows == 0:
        raise JobError(f"no item vectors for model {model_hash[:12]}: run `embsum precompute` first")
    stale = cat.count("items") - current.num_rows
    if stale:
        log.warning("%d items have no vector for their current text (run `embsum precompute`): left out", stale)
    blocks = F.Blocks(sp.n, sp.d, current.num_rows,
                      iterate=lambda: E.iterate(cat, model_hash, E.ITEM, cfg.chunk_size),
                      fetch=lambda ids: E.read(cat, model_hash, E.ITEM, ids))
    snap, why = None, "rebuild requested" if rebuild else None
    if not rebuild:
        try:
            snap = S.load(root, model_hash)
        except S.IndexFileError as err:
            why = "no index yet" if S.current_version(root) is None else str(err)
    counts = {"index_items": current.num_rows, "items_without_vector": stale}
    if snap is not None:
        d = F.diff(snap, current)
        if d.size == 0:
            log.info("index %s is current (%d items)", snap.version, current.num_rows)
            counts.update(index_action="unchanged", index_version=snap.version)
            return _record(run, counts)
        why = F.needs_rebuild(snap, d, current.num_rows, cfg)
        if why is None:
            version, manifest = F.update(root, snap, d, blocks, cfg, run.run_id if run else None)
            counts.update(index_action="update", index_version=version, index_added=len(d.new),
                          index_replaced=len(d.changed), index_removed=len(d.removed))
            return _record(run, counts)
    log.info("full index build: %s", why)
    version, manifest = F.build(root, model_hash, blocks, cfg, run.run_id if run else None)
    counts.update(index_action="build", index_version=version, index_factory=manifest["factory"],
                  index_vectors=manifest["n_vectors"])
    return _record(run, counts)


def _record(run: RunRecord | None, counts: dict) -> dict:
    if run is not None:
        run.counts.update(counts)
    return counts
