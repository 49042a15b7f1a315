"""The summary job: which users need a summary, batched generation, checks, retry, writing.

- Which users: those whose summary_key = hash(history_hash, prompt_hash, model) has no unflagged
  row (embsum.index.summaries.pending_users). A nightly re-run therefore touches only new users and
  users whose history changed, plus earlier flagged outputs, which get another try.
- Kill safety: each batch of users is generated, checked and committed in its own transaction;
  a killed run loses at most the batch in flight and the next run starts after the last one.
- Padding: a window of `bucket_window` batches is rendered first and cut into batches of similar
  prompt length (a batch pads every prompt to its longest one).
- Checks: an empty, over-long or echo-only output is generated once more with seed + 1 at the
  retry temperature; still bad, it is stored with flagged = TRUE and its flag_reason, so it
  stays inspectable but is never a training target (embsum.index.summaries.training_summaries).
- Nothing to do, nothing loaded: the model loads only when some user is pending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from embsum.index.catalog import Catalog
from embsum.index.summaries import pending_users, summary_key, upsert_summaries
from embsum.offline.common import progress
from embsum.offline.ingest.formats import EXTENSIONS, _generic_reader
from embsum.offline.ingest.job import IMPORT_BACKEND, IMPORT_MODEL, IMPORT_PROMPT
from embsum.offline.ingest.records import MISSING_ID, FormatError

from embsum.summarizer import Backend, Item, PromptTemplate, SummarizerConfig, check_summary, clean_summary
from embsum.summarizer.backends import model_label
from embsum.summarizer.batching import length_buckets

log = logging.getLogger("embsum.summarize")

NO_ITEM_TEXT = "no item text"  # flag_reason: none of the user's items is in the catalog's items


def _items_by_id(cat: Catalog, item_ids) -> dict[str, Item]:
    table = cat.items(list(item_ids)).select(["item_id", "title", "description"]).to_pydict()
    return {i: Item(t or "", d or "") for i, t, d in zip(table["item_id"], table["title"], table["description"])}


def _user_items(cat: Catalog, user_ids: list[str]) -> dict[str, list[Item]]:
    """Each user's history (oldest first) as items with text; unknown item ids are left out."""
    histories = cat.histories(user_ids)
    items = _items_by_id(cat, {i for h in histories.values() for i in h})
    return {u: [items[i] for i in histories.get(u, []) if i in items] for u in user_ids}


def _check(config: SummarizerConfig, text: str, titles) -> str | None:
    return check_summary(text, titles, config.max_summary_words, config.min_novel_fraction)


def generate_checked(backend: Backend, prompts, config: SummarizerConfig) -> tuple[list[str], list[str | None], int]:
    """Generate, check, retry the bad ones once (seed + 1, retry temperature), check again.
    Returns texts, flag reasons (None = good) and how many were retried."""
    texts = [clean_summary(t) for t in backend.generate(prompts, config.seed, config.temperature)]
    reasons = [_check(config, t, p.titles) for t, p in zip(texts, prompts)]
    bad = [i for i, r in enumerate(reasons) if r]
    if bad:
        again = backend.generate([prompts[i] for i in bad], config.seed + 1, config.retry_temperature)
        for i, text in zip(bad, again):
            text = clean_summary(text)
            reason = _check(config, text, prompts[i].titles)
            log.debug("retried %d: %r -> %r (%s)", i, texts[i], text, reason or "ok")
            # A still-bad retry keeps the first text: both failed, the first is the reproducible one.
            if reason is None:
                texts[i], reasons[i] = text, None
    return texts, reasons, len(bad)


def summarize(cat: Catalog, config: SummarizerConfig, template: PromptTemplate,
              backend_factory: Callable[[], Backend], user_ids=None, limit: int | None = None,
              counts: dict | None = None) -> dict:
    """Summarize every pending user (or the pending ones among `user_ids`, at most `limit`).
    `counts` (a run record's dict) is updated batch by batch, so a failed run still reports
    what it wrote. Returns the counts: pending, written, flagged, retried."""
    counts = counts if counts is not None else {}
    model = model_label(config)
    todo = pending_users(cat, template.hash, model, user_ids)
    if limit is not None:
        todo = todo[:limit]
    counts.update(pending=len(todo), written=0, flagged=0, retried=0)
    log.info("%d users need a summary (prompt %s, model %s)", len(todo), template.hash[:10], model)
    if not todo:
        return counts
    backend = backend_factory()
    counter = backend.counter()
    window = config.batch_size * config.bucket_window
    try:
        with progress(total=len(todo), unit="user", desc="summarize") as bar:
            for start in range(0, len(todo), window):
                chunk = todo[start:start + window]
                items = _user_items(cat, [u for u, _, _ in chunk])
                # Users none of whose items has text get flagged without a model call.
                prompts = {u: template.render(items[u], counter) for u, _, _ in chunk if items[u]}
                # Batches of similar prompt length pad less (each batch is still its own commit).
                lengths = [counter.count(prompts[u].user) if u in prompts else 0 for u, _, _ in chunk]
                for idx in length_buckets(lengths, config.batch_size):
                    batch = [chunk[i] for i in idx]
                    _summarize_batch(cat, config, template, backend, model, batch, prompts, counts)
                    bar.update(len(batch))
    finally:
        backend.close()
    return counts


def _summarize_batch(cat: Catalog, config: SummarizerConfig, template: PromptTemplate, backend: Backend,
                     model: str, batch: list, prompts: dict, counts: dict) -> None:
    """Generate, check and commit one batch of (user, history_hash, key)."""
    usable = [u for u, _, _ in batch if u in prompts]
    texts, reasons, retried = generate_checked(backend, [prompts[u] for u in usable], config) if usable \
        else ([], [], 0)
    results = dict(zip(usable, zip(texts, reasons)))
    rows = [{"user_id": u, "summary_key": key, "history_hash": h, "backend": backend.name,
             "model": model, "prompt_hash": template.hash,
             "summary": results.get(u, (None, NO_ITEM_TEXT))[0] or None,
             "flag_reason": results.get(u, (None, NO_ITEM_TEXT))[1]}
            for u, h, key in batch]
    for row in rows:
        row["flagged"] = row["flag_reason"] is not None
    with cat.transaction():
        upsert_summaries(cat, rows)
    counts["written"] += len(rows)
    counts["flagged"] += sum(r["flagged"] for r in rows)
    counts["retried"] += retried
    log.debug("batch committed (%d users)", len(rows))


# -- import of existing summaries ----------------------------------------------------------------
def _summary_text(values: dict, column: str) -> str:
    value = values.get(column)
    if isinstance(value, list):  # Goodreads llm_interests: keywords
        return ", ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    return "" if value is None else str(value).strip()


def import_file(cat: Catalog, path: str | Path, config: SummarizerConfig, text_column: str | None = None,
                run_id: str | None = None, counts: dict | None = None, batch_size: int = 2000) -> dict:
    """Existing summaries from a file (JSONL, CSV/TSV or Parquet with `user_id` and `summary`, or
    the Goodreads users.jsonl / its folder, whose `llm_interests` keywords are joined with ", ")
    -> `summaries`, keyed on each user's current history. Same key as `embsum ingest` uses for
    Goodreads (so the two never duplicate each other). Checked like generated ones (no retry: the
    text is what it is); unknown users and bad rows go to `rejects`."""
    counts = counts if counts is not None else {}
    path = Path(path)
    if path.is_dir():
        path = path / "users.jsonl"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise FormatError(f"{path}: cannot tell the format from the name (.jsonl, .csv, .tsv or .parquet)")
    reader = _generic_reader(path, fmt, quoting=True, batch_size=batch_size)
    column = text_column or next((c for c in ("summary", "llm_interests") if c in reader.columns), None)
    if column is None or column not in reader.columns or "user_id" not in reader.columns:
        raise FormatError(f"{path}: needs a user_id column and a summary column (`summary`, `llm_interests` "
                          f"or the one given with --text-column); columns: {', '.join(reader.columns)}")
    model = config.model or (IMPORT_MODEL if column == "llm_interests" else f"import-{column}")
    counts.update(written=0, flagged=0, rejected=0)
    source = str(path)
    cat.clear_rejects(source)

    def flush(records: list) -> None:
        ids = [str(r.values.get("user_id") or "") for r in records]
        hashes = dict(zip(*cat.users(ids).to_pydict().values()))
        items = _user_items(cat, [u for u in ids if u in hashes])
        rows, rejects = [], []
        for user, record in zip(ids, records):
            if user not in hashes:
                reason = "unknown_user" if user else MISSING_ID
                rejects.append({"line": record.line, "raw": record.raw, "reason": reason})
                continue
            text = _summary_text(record.values, column)
            reason = _check(config, text, [it.title for it in items.get(user, [])])
            rows.append({"user_id": user, "summary_key": summary_key(hashes[user], IMPORT_PROMPT, model),
                         "history_hash": hashes[user], "backend": IMPORT_BACKEND, "model": model,
                         "prompt_hash": IMPORT_PROMPT, "summary": text or None,
                         "flagged": reason is not None, "flag_reason": reason})
        with cat.transaction():
            upsert_summaries(cat, rows)
            cat.add_rejects(rejects, run_id, source)
        counts["written"] += len(rows)
        counts["flagged"] += sum(r["flagged"] for r in rows)
        counts["rejected"] += len(rejects)

    batch: list = []
    bad: list[dict] = []
    for record in progress(reader, unit="row", desc="import"):
        if record.error:
            bad.append({"line": record.line, "raw": record.raw, "reason": record.error})
            continue
        batch.append(record)
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if bad:
        with cat.transaction():
            cat.add_rejects(bad, run_id, source)
        counts["rejected"] += len(bad)
    return counts

