"""Training and evaluation inputs read from the catalog: item texts, histories, summaries.

The model layer (embsum/) takes plain ids and texts; this is the one place that turns the
DuckDB catalog into them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from index.catalog import Catalog
from index.summaries import training_summaries
from offline.texts import item_text

log = logging.getLogger(__name__)

# --summary-source values besides a backend name.
SUMMARY_ANY, SUMMARY_NONE = "any", "none"


@dataclass
class CatalogData:
    item_ids: list[str]  # sorted as strings: the goodreads-v1 order
    item_texts: list[str]  # offline.texts.item_text, aligned with item_ids
    histories: dict[str, list[str]]  # every user's positive items, oldest first
    summaries: dict[str, str]  # user -> summary text (training targets)


def read_summaries(cat: Catalog, source: str = SUMMARY_ANY) -> dict[str, str]:
    """'any': the newest unflagged summary matching each user's history, whatever wrote it;
    'none': no summaries (lambda effectively 0); otherwise a backend name ('import' for the
    imported Goodreads llm_interests, or the summarize backend that wrote them)."""
    if source == SUMMARY_NONE:
        return {}
    return training_summaries(cat, backend=None if source == SUMMARY_ANY else source)


def load_catalog_data(cat: Catalog, summary_source: str = SUMMARY_ANY) -> CatalogData:
    items = cat.items()
    ids = items.column("item_id").to_pylist()
    texts = [item_text(t, d) for t, d in zip(items.column("title").to_pylist(),
                                             items.column("description").to_pylist())]
    order = sorted(range(len(ids)), key=ids.__getitem__)  # catalog order is item_id already; be sure
    summaries = read_summaries(cat, summary_source)
    data = CatalogData([ids[i] for i in order], [texts[i] for i in order], cat.histories(), summaries)
    log.info("catalog: %d items, %d users, %d summaries (source %s)", len(data.item_ids), len(data.histories),
             len(summaries), summary_source)
    return data
