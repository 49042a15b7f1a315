"""The text a model reads for an item, and its key: ONE definition for every stage.

`item_text(title, description, category)` = `"{title}. {category}. {description}"` with a
missing or blank part left out, so an item without a category (Goodreads) reads exactly
`"{title}. {description}"` (the goodreads-v1 template of EVAL.md). It lives in
`embsum.index.catalog` (the catalog keys each item at ingest and index/ never imports offline/) and is
re-exported here: offline code (precompute, train, evaluate, align) takes its texts from this
module, and `items.content_hash` is `content_hash(item_text(...))`, so a vector's key is the
hash of exactly the text it was encoded from.
"""

from __future__ import annotations

import pyarrow as pa
from embsum.index.catalog import content_hash, history_hash, item_key, item_text

__all__ = ["content_hash", "history_hash", "item_key", "item_text", "item_texts"]


def item_texts(items: pa.Table) -> list[str]:
    """`item_text` of every row of an items table (`cat.items()`, `cat.iter_items()` chunks):
    the columns title, description and, where present, category."""
    n = items.num_rows
    column = {c: items[c].to_pylist() if c in items.column_names else [None] * n
              for c in ("title", "description", "category")}
    return [item_text(t, d, c) for t, d, c in zip(column["title"], column["description"], column["category"])]
