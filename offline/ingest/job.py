"""The ingest job: planned sources -> the catalog, one transaction per batch.

Kill safety: every batch (its rows, its rejects, the users it touches, imported summaries) is
one transaction, so a killed ingest leaves whole batches only. A re-run converges on the same
table contents as an uninterrupted run because
- items and interactions are upserts keyed by their ids (unchanged rows are not touched);
- interaction positions come from the file itself (index in a history, or the line), never
  from what the catalog already holds;
- the rejects of a file are replaced, not appended: the first batch of a file deletes the
  file's earlier rejects (`rejects.source` = the file's absolute path) in its transaction.
So `rejects` always describe the latest ingest of each file; `runs.counts` keep each run's own
numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from embsum.index.catalog import Catalog
from embsum.index.summaries import summary_key, upsert_summaries
from embsum.offline.ingest.formats import ITEMS, Batch, Mapping, Source, plan_sources
from embsum.offline.ingest.records import UNKNOWN_ITEM

log = logging.getLogger("embsum.ingest")

# Imported Goodreads interests, as the summaries table names their origin.
IMPORT_BACKEND, IMPORT_MODEL, IMPORT_PROMPT = "import", "goodreads-llm_interests", "import"
# Test hook: seconds to sleep after each committed batch, so a test can SIGKILL mid-ingest.
SLEEP_ENV = "EMBSUM_TEST_SLEEP_AFTER_BATCH"


@dataclass
class IngestConfig:
    format: str = field(default="auto", metadata={"help": "auto, tsv, csv, jsonl, parquet, mind, goodreads, movielens."})
    kind: str = field(default="auto", metadata={"help": "items, interactions, or auto (a user column means interactions)."})
    batch_size: int = field(default=5000, metadata={"help": "Records per batch (one transaction each)."})
    max_reject_rate: float | None = field(
        default=None, metadata={"help": "Fail (non-zero exit) when rejected / read rows exceeds this fraction."})
    quoting: bool = field(default=True, metadata={"help": "TSV/CSV: honour \"quoted\" fields (off: split on the delimiter only)."})

    def __post_init__(self):
        from embsum.offline.ingest.formats import FORMATS

        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.kind not in ("auto", "items", "interactions"):
            raise ValueError(f"kind must be auto, items or interactions, not {self.kind!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_reject_rate is not None and not 0 <= self.max_reject_rate <= 1:
            raise ValueError(f"max_reject_rate must be within [0, 1], got {self.max_reject_rate}")


@dataclass
class SourceReport:
    path: str
    kind: str
    counts: Counter = field(default_factory=Counter)  # records, new, updated, unchanged, ...
    rejects: Counter = field(default_factory=Counter)  # reason -> rows
    notes: list[str] = field(default_factory=list)  # the source's choices made for the user

    @property
    def landed(self) -> int:
        return self.counts["new"] + self.counts["updated"] + self.counts["unchanged"]

    def line(self) -> str:
        c = self.counts
        text = (f"{Path(self.path).name}: {self.landed} {self.kind} "
                f"({c['new']} new, {c['updated']} updated, {c['unchanged']} unchanged)")
        if self.kind != ITEMS:
            text += (f", {c['positives']} positives, {c['dislikes']} explicit dislikes"
                     f", {c['users_changed']} user history updates")
        if c["summaries"]:
            text += f", {c['summaries']} summaries imported"
        if c["duplicates"]:
            text += f", {c['duplicates']} exact duplicates skipped"
        return text + f"; {sum(self.rejects.values())} rejected"


@dataclass
class IngestReport:
    run_id: str
    sources: list[SourceReport] = field(default_factory=list)
    status: str = "ok"

    @property
    def landed(self) -> int:
        return sum(s.landed for s in self.sources)

    @property
    def rejects(self) -> Counter:
        return sum((s.rejects for s in self.sources), Counter())

    @property
    def reject_rate(self) -> float:
        rejected = sum(self.rejects.values())
        return rejected / max(1, rejected + self.landed)

    def counts(self) -> dict:
        """Flat totals for runs.counts: `<kind>_<what>` and `rejected_<reason>`."""
        out: Counter = Counter()
        for s in self.sources:
            for key, n in s.counts.items():
                out[f"{s.kind}_{key}"] += n
        for reason, n in self.rejects.items():
            out[f"rejected_{reason}"] += n
        out["rejected"] = sum(self.rejects.values())
        return dict(out)

    def summary(self) -> list[str]:
        lines = [f"{Path(s.path).name}: {note}" for s in self.sources for note in s.notes]
        lines += [s.line() for s in self.sources]
        rejects = self.rejects
        by_reason = ", ".join(f"{reason} {n}" for reason, n in rejects.most_common()) or "none"
        lines.append(f"total: {self.landed} rows ingested, {sum(rejects.values())} rejected ({by_reason})")
        return lines


def _items_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.table({name: pa.array(col, pa.string())
                     for name, col in zip(("item_id", "title", "description", "category"), cols)})


def _interactions_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[]] * 5
    return pa.table({
        "user_id": pa.array(cols[0], pa.string()),
        "item_id": pa.array(cols[1], pa.string()),
        "position": pa.array(cols[2], pa.int32()),
        "ts": pa.array(cols[3], pa.timestamp("us")),
        "label": pa.array(cols[4], pa.int16()),
    })


def import_summaries(cat: Catalog, pairs: list[tuple[str, str]]) -> int:
    """Imported interests -> `summaries`, keyed on each user's current history hash; rows
    already there with the same text are left alone (a re-ingest touches nothing)."""
    hashes = dict(zip(*cat.users([u for u, _ in pairs]).to_pydict().values()))
    rows = [{"user_id": user, "summary": text, "backend": IMPORT_BACKEND, "model": IMPORT_MODEL,
             "prompt_hash": IMPORT_PROMPT, "history_hash": hashes[user],
             "summary_key": summary_key(hashes[user], IMPORT_PROMPT, IMPORT_MODEL)}
            for user, text in pairs if user in hashes]
    if not rows:
        return 0
    keys = pa.table({"user_id": [r["user_id"] for r in rows], "summary_key": [r["summary_key"] for r in rows]})
    with cat.registered("_summary_keys", keys):
        existing = {(u, k): s for u, k, s in cat.con.execute(
            "SELECT s.user_id, s.summary_key, s.summary FROM summaries s"
            " JOIN _summary_keys q USING (user_id, summary_key)").fetchall()}
    rows = [r for r in rows if existing.get((r["user_id"], r["summary_key"])) != r["summary"]]
    return upsert_summaries(cat, rows)


def _label_counts(rows: list[tuple]) -> dict[str, int]:
    """Positives (label 1 or none) and explicit dislikes (label 0) among interaction rows, one
    per stored key (user, position, item), as the catalog keeps them."""
    labels = {(row[0], row[2], row[1]): row[4] for row in rows}
    dislikes = sum(label == 0 for label in labels.values())
    return {"positives": len(labels) - dislikes, "dislikes": dislikes}


def _write_batch(cat: Catalog, source: Source, batch: Batch, report: SourceReport, run_id: str | None) -> None:
    """One batch: rows, the users it touches, summaries and rejects, all in the caller's transaction."""
    if source.kind == ITEMS:
        counts = cat.upsert_items(_items_table(batch.rows), source=source.name)
    else:
        known = cat.existing_items({row[1] for row in batch.rows})
        good = [row for row in batch.rows if row[1] in known]
        batch.rejects.extend({"line": row[5], "reason": UNKNOWN_ITEM,
                              "raw": row[6] or f"user_id={row[0]} item_id={row[1]} position={row[2]}"}
                             for row in batch.rows if row[1] not in known)
        counts = cat.upsert_interactions(_interactions_table(good), source=source.name,
                                         replace_users=source.replace_users)
        counts.update(_label_counts(good))
        if batch.summaries:
            counts["summaries"] = import_summaries(cat, batch.summaries)
    cat.add_rejects(batch.rejects, run_id, source.name)
    report.counts.update(counts)
    report.counts.update({"records": batch.records, "duplicates": batch.duplicates})
    report.rejects.update(r["reason"] for r in batch.rejects)


def ingest_source(cat: Catalog, source: Source, batch_size: int, run_id: str | None, bar=None) -> SourceReport:
    report = SourceReport(source.name, source.kind, notes=list(source.notes))
    for note in source.notes:
        log.info("%s: %s", source.path.name, note)
    pause = float(os.environ.get(SLEEP_ENV) or 0)
    cleared = False
    for number, batch in enumerate(source.batches(batch_size), 1):
        with cat.transaction():
            if not cleared:
                cat.clear_rejects(source.name)
                cleared = True
            _write_batch(cat, source, batch, report, run_id)
        log.debug("%s: batch %d committed (%d records)", source.path.name, number, batch.records)
        if bar is not None:
            bar.update(batch.records)
        if pause:
            time.sleep(pause)
    if not cleared:  # an empty file still replaces the file's old rejects
        with cat.transaction():
            cat.clear_rejects(source.name)
    log.debug(report.line())
    return report


def ingest(cat: Catalog, paths: list[str | Path], config: IngestConfig | None = None,
           mapping: Mapping | None = None, progress=None) -> IngestReport:
    """Ingest `paths` into `cat` as one recorded run (`runs` kind 'ingest').

    Status: 'ok'; 'empty' when no row landed; 'rejects_exceeded' when the reject rate is over
    config.max_reject_rate (the good rows are kept either way). FormatError propagates."""
    config = config or IngestConfig()
    args = {"paths": [str(Path(p).resolve()) for p in paths], **config.__dict__,
            "mapping": {k: v for k, v in (mapping or Mapping()).__dict__.items() if v}}
    with cat.run("ingest", args) as run:  # opened first: an unreadable input leaves a 'failed' row
        sources = plan_sources(paths, config.format, config.kind, mapping, config.quoting, config.batch_size)
        report = IngestReport(run.run_id)
        for source in sources:
            bar = progress(desc=source.path.name, unit=" rows") if progress else None
            try:
                report.sources.append(ingest_source(cat, source, config.batch_size, run.run_id, bar))
            finally:
                if bar is not None:
                    bar.close()
        if report.landed == 0:
            report.status = "empty"
            run.fail("nothing usable was read (every row was rejected or the input is empty)")
        elif config.max_reject_rate is not None and report.reject_rate > config.max_reject_rate:
            report.status = "rejects_exceeded"
            run.fail(f"reject rate {report.reject_rate:.1%} is over max_reject_rate {config.max_reject_rate:.1%}")
        run.counts.update(report.counts())
    return report
