"""The nightly refresh: ingest what arrived, re-encode what changed, bring the index in line,
swap it in, all recorded in `runs`.

Every step is idempotent on its own (ingest upserts, precompute skips what is stored for the
current hashes, the index step diffs the live snapshot against the catalog), so:
- a second refresh over the same inputs changes nothing (and writes no new index version);
- what "changed" means is the keys (index/catalog.py: `item_key`, `history_hash`): an item
  whose model text changed is re-encoded, and so is every user whose history holds it (ingest
  re-keys those users in the item batch's transaction);
- a refresh killed anywhere is finished by simply running it again: committed chunks are
  kept, the index is rebuilt or updated from whatever snapshot is live, and a half-written
  version folder is never made live.
One refresh per catalog at a time (`embsum.index.lock`); a second one exits at once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from embsum.index import failpoints
from embsum.index.faiss_index import IndexConfig
from embsum.index.lock import exclusive, lock_path
from embsum.offline.indexing import default_index_dir, load_model, sync_index
from embsum.offline.job_configs import PrecomputeConfig, RefreshConfig
from embsum.offline.precompute import precompute

log = logging.getLogger("embsum.refresh")


def refresh(db_path: str | Path, checkpoint: str, cfg: RefreshConfig, pre: PrecomputeConfig,
            idx: IndexConfig, progress=None, wait_s: float = 0.0) -> dict:
    """Run the whole refresh under the refresh lock; returns the run's counts.

    Like precompute, it takes the catalog's job lock (a writer job started meanwhile waits and
    names this refresh) and opens its `runs` row before loading the model (a broken checkpoint
    leaves a 'failed' row); the catalog file itself is held only while a step reads or commits."""
    from embsum.index.catalog import Catalog

    with exclusive(lock_path(db_path)), \
            Catalog(db_path, wait_s=wait_s, job="refresh", keep_open=False) as cat, \
            cat.run("refresh", {"checkpoint": str(checkpoint), **asdict(cfg), "precompute": asdict(pre),
                                "index": asdict(idx)}) as run:
        cat.job_lock.note_run(run.run_id)
        cat.release()  # readers may come in while the model loads
        model, model_hash = load_model(checkpoint, pre.device)
        run.args["model_hash"] = model_hash
        root = Path(cfg.index_dir) if cfg.index_dir else default_index_dir(db_path)
        if cfg.inputs:
            from embsum.offline.ingest.job import IngestConfig, ingest

            report = ingest(cat, cfg.inputs, IngestConfig(format=cfg.format), progress=progress)
            run.counts.update({f"ingest_{k}": v for k, v in report.counts().items()
                               if isinstance(v, int)})
            run.counts["ingest_run_id"] = report.run_id
        failpoints.hit("refresh.after_ingest")
        precompute(cat, model, model_hash, pre, run, progress=progress)
        failpoints.hit("refresh.after_precompute")
        sync_index(cat, root, model_hash, idx, run, rebuild=cfg.rebuild)
        failpoints.hit("refresh.after_index")
        counts = dict(run.counts)
    log.info("refresh done: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
