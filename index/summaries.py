"""The `summaries` table: one LLM-written (or imported) interest summary per user and key.

summary_key = hash(history_hash, prompt_hash, model): a nightly re-run only summarizes users
whose key has no row yet. Flagged rows (empty, over-long, echo-only output) are kept for
inspection and never returned as training targets.
"""

from __future__ import annotations

import pyarrow as pa

from .catalog import Catalog, _sha1, history_hash, now

SUMMARY_COLUMNS = {
    "user_id": pa.string(),
    "summary_key": pa.string(),
    "summary": pa.string(),
    "backend": pa.string(),
    "model": pa.string(),
    "prompt_hash": pa.string(),
    "history_hash": pa.string(),
    "flagged": pa.bool_(),
    "flag_reason": pa.string(),
}


def summary_key(history_hash: str, prompt_hash: str, model: str) -> str:
    return _sha1([history_hash, prompt_hash, model])


def upsert_summaries(cat: Catalog, rows: list[dict]) -> int:
    """Insert or replace summaries (dicts with SUMMARY_COLUMNS keys) in one statement.
    Call inside the batch's transaction."""
    if not rows:
        return 0
    table = pa.table({
        **{name: pa.array([r.get(name) for r in rows], type_) for name, type_ in SUMMARY_COLUMNS.items()},
        "created_at": pa.array([now()] * len(rows), pa.timestamp("us")),
    })
    table = table.set_column(
        table.schema.get_field_index("flagged"), "flagged",
        pa.array([bool(r.get("flagged", False)) for r in rows], pa.bool_()),
    )
    with cat.registered("_summaries_in", table):
        cat.con.execute(
            "INSERT OR REPLACE INTO summaries "
            f"SELECT {', '.join(SUMMARY_COLUMNS)}, created_at FROM _summaries_in"
        )
    return len(rows)


def pending_users(cat: Catalog, prompt_hash: str, model: str, user_ids=None) -> list[tuple[str, str, str]]:
    """(user_id, history_hash, summary_key) of the users that need a summary for this prompt and
    model: no unflagged row under their current key (new users, changed histories, and earlier
    flagged outputs, which get another chance). Users without any positive item are left out:
    there is nothing to summarize. In user_id order, so runs and resumes go the same way."""
    users = cat.users(user_ids)
    empty = history_hash([])
    ids, hashes = users.column("user_id").to_pylist(), users.column("history_hash").to_pylist()
    wanted = [(u, h, summary_key(h, prompt_hash, model)) for u, h in zip(ids, hashes) if h and h != empty]
    table = pa.table({name: pa.array([w[i] for w in wanted], pa.string())
                      for i, name in enumerate(("user_id", "history_hash", "summary_key"))})
    with cat.registered("_wanted", table):
        return [tuple(r) for r in cat.con.execute(
            "SELECT w.user_id, w.history_hash, w.summary_key FROM _wanted w"
            " WHERE NOT EXISTS (SELECT 1 FROM summaries s WHERE s.user_id = w.user_id"
            "                   AND s.summary_key = w.summary_key AND NOT s.flagged)"
            " ORDER BY w.user_id").fetchall()]


def training_summaries(cat: Catalog, backend: str | None = None, model: str | None = None) -> dict[str, str]:
    """user_id -> summary text to supervise the decoder: unflagged, matching the user's current
    history, the newest per user; optionally only from one backend/model."""
    where, params = ["NOT s.flagged", "s.summary IS NOT NULL", "s.history_hash = u.history_hash"], []
    if backend:
        where.append("s.backend = ?")
        params.append(backend)
    if model:
        where.append("s.model = ?")
        params.append(model)
    rows = cat.con.execute(
        "SELECT user_id, summary FROM ("
        "  SELECT s.user_id, s.summary, row_number() OVER (PARTITION BY s.user_id ORDER BY s.created_at DESC) AS rk"
        "  FROM summaries s JOIN users u USING (user_id)"
        f"  WHERE {' AND '.join(where)}"
        ") WHERE rk = 1",
        params,
    ).fetchall()
    return dict(rows)
