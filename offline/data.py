"""Training and evaluation inputs read from the catalog: item texts, histories, summaries.

The model layer (embsum/) takes plain ids and texts; this is the one place that turns the
DuckDB catalog into them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from embsum.index.catalog import Catalog
from embsum.index.summaries import training_summaries
from embsum.offline.texts import item_texts

log = logging.getLogger(__name__)

# --summary-source values besides a backend name.
SUMMARY_ANY, SUMMARY_NONE = "any", "none"


@dataclass
class CatalogData:
    item_ids: list[str]  # sorted as strings: the goodreads-v1 order
    item_texts: list[str]  # embsum.offline.texts.item_text (what the item vectors are keyed on), aligned with item_ids
    histories: dict[str, list[str]]  # every user's positive items, oldest first
    summaries: dict[str, str]  # user -> summary text (training targets)
    # user -> explicit dislikes (label-0 interactions that are no positive), sorted: hard negatives
    dislikes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def index(self) -> dict[str, int]:
        """item id -> its position in item_ids (the row of texts, bank rows and score columns)."""
        return {item: i for i, item in enumerate(self.item_ids)}


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
    texts = item_texts(items)
    order = sorted(range(len(ids)), key=ids.__getitem__)  # catalog order is item_id already; be sure
    summaries = read_summaries(cat, summary_source)
    histories = cat.histories()
    data = CatalogData([ids[i] for i in order], [texts[i] for i in order], histories, summaries,
                       explicit_dislikes(cat.interacted(), histories))
    log.info("catalog: %d items, %d users, %d summaries (source %s), %d users with dislikes", len(data.item_ids),
             len(data.histories), len(summaries), summary_source, len(data.dislikes))
    return data


def explicit_dislikes(interacted: dict[str, list[str]], histories: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every label of `Catalog.interacted` minus the positives (label 1 or NULL) of `histories`:
    the label-0 items (an item both liked and disliked counts as liked). Users without any are
    left out."""
    out = {}
    for user, items in interacted.items():
        liked = set(histories.get(user, ()))
        disliked = [i for i in items if i not in liked]
        if disliked:
            out[user] = disliked
    return out


def train_data(data: CatalogData, examples: list[tuple[str, list[str], str]]):
    """The model layer's TrainData for `examples` (training_examples) over this catalog's items,
    histories, summaries and dislikes."""
    from embsum.training.trainer import TrainData

    return TrainData(data.item_ids, data.item_texts, examples, data.histories, data.summaries, data.dislikes)


def training_examples(data: CatalogData, mode: str = "prefixes", limit_users: int = 0,
                      all_users: bool = False) -> list[tuple[str, list[str], str]]:
    """The (user, input history, target) examples `embsum train` learns from. By default the
    train-split users only (goodreads-v1: dev and test users stay held out for evaluation);
    `all_users` (a production model) adds the dev and test users' full histories, so nothing is
    held out and no dev score of that model means anything."""
    from embsum.evaluation.protocol import train_examples

    return train_examples(data.histories, mode, limit_users, all_users=all_users)
