"""What each input format means: records (offline/ingest/records.py) -> catalog rows + rejects.

A `Source` is one file read as items or interactions; `plan_sources()` turns the command line
(paths, --format, --kind, column flags) into the ordered list of sources to ingest: every
items file before any interactions file, so that interactions are checked against the items
the same command brings in.

Formats:
- tsv / csv / jsonl / parquet: one row per item or per interaction, columns by mapping flags.
- goodreads (folder): books.tsv (items) + users.jsonl (a user's whole history a line; the
  history replaces the stored one; llm_interests are imported as summaries).
- mind (folder or the two files): news.tsv (items) + behaviors.tsv (history clicks as label 1,
  then impressions with labels 1/0 and the impression time).
- movielens (folder): MovieLens-100K as RecBole atomic files ml-100k.item / ml-100k.inter
  (the files inside the recbole wheel): rating >= 4 is label 1, below is label 0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from offline.ingest.records import (
    BAD_VALUE,
    DUPLICATE_ID,
    EMPTY_TEXT,
    MISSING_ID,
    DelimitedReader,
    FormatError,
    JsonlReader,
    ParquetReader,
    Record,
)

EMPTY_HISTORY = "empty_history"

ITEMS, INTERACTIONS = "items", "interactions"
FORMATS = ("auto", "tsv", "csv", "jsonl", "parquet", "mind", "goodreads", "movielens")
DATASETS = {  # folder format -> (items file, interactions file)
    "goodreads": ("books.tsv", "users.jsonl"),
    "mind": ("news.tsv", "behaviors.tsv"),
    "movielens": ("ml-100k.item", "ml-100k.inter"),
}
EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MIND_NEWS_COLUMNS = ["news_id", "category", "subcategory", "title", "abstract", "url",
                     "title_entities", "abstract_entities"]
MIND_BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
# Column names tried, in order, when no mapping flag names one.
ID_CANDIDATES = ("item_id", "id", "book_id", "news_id", "movie_id")
USER_CANDIDATES = ("user_id", "user", "uid")
ITEM_REF_CANDIDATES = ("item_id", "item", "book_id", "news_id", "movie_id")
TIME_CANDIDATES = ("ts", "time", "timestamp", "datetime")
LABEL_CANDIDATES = ("label", "clicked")


@dataclass
class Mapping:
    """Column-mapping flags (None: pick from the *_CANDIDATES names present in the file)."""

    id_col: str | None = None
    title_col: str | None = None
    description_col: str | None = None
    category_col: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    label_col: str | None = None


@dataclass
class Batch:
    """What one batch of records turned into. Interaction rows are (user_id, item_id, position,
    ts, label, line, raw): line and raw (None: the job describes the reference itself) let the
    job reject a reference to an unknown item with its line."""

    rows: list[tuple] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    summaries: list[tuple[str, str]] = field(default_factory=list)  # (user_id, imported summary)
    records: int = 0
    duplicates: int = 0  # same id, same content again in the file: skipped silently


@dataclass
class Source:
    path: Path
    kind: str  # ITEMS or INTERACTIONS
    reader: object  # an iterable of Records with .columns
    mapper: Callable[[Record, Batch], None]
    replace_users: bool = False  # snapshot rows: a user's record is its whole history

    @property
    def name(self) -> str:
        return str(self.path.resolve())

    def batches(self, batch_size: int) -> Iterator[Batch]:
        batch = Batch()
        for record in self.reader:
            batch.records += 1
            if record.error:
                batch.rejects.append(reject(record, record.error))
            else:
                self.mapper(record, batch)
            if batch.records >= batch_size:
                yield batch
                batch = Batch()
        if batch.records:
            yield batch


def reject(record: Record, reason: str, raw: str | None = None) -> dict:
    return {"line": record.line, "raw": record.raw if raw is None else raw, "reason": reason}


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def parse_time(value) -> dt.datetime | None:
    """Unix seconds, ISO 8601, or MIND's `11/12/2019 2:14:46 PM`; naive UTC. ValueError if none."""
    text = _text(value)
    if not text:
        return None
    try:
        return dt.datetime.fromtimestamp(float(text), dt.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        parsed = dt.datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p")
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed


_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}


def parse_label(value) -> int | None:
    text = _text(value).lower()
    if not text:
        return None
    if text not in _LABELS:
        raise ValueError(f"label {value!r} is not 0/1")
    return _LABELS[text]


def _digest(*parts) -> str:
    return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()


class ItemMapper:
    def __init__(self, id_col: str, title_col: str | None, description_col: str | None,
                 category_col: str | None = None, transform: Callable[[dict], dict] | None = None):
        self.cols = (id_col, title_col, description_col, category_col)
        self.transform = transform
        self.seen: dict[str, str] = {}

    def __call__(self, record: Record, batch: Batch) -> None:
        values = self.transform(record.values) if self.transform else record.values
        id_col, title_col, description_col, category_col = self.cols
        item_id = _text(values.get(id_col))
        title, description, category = (
            _text(values.get(c)) or None if c else None for c in (title_col, description_col, category_col))
        if not item_id:
            batch.rejects.append(reject(record, MISSING_ID))
        elif not title and not description:
            batch.rejects.append(reject(record, EMPTY_TEXT))
        elif _first_or_same(self.seen, item_id, _digest(title, description, category), record, batch):
            batch.rows.append((item_id, title, description, category))


def _first_or_same(seen: dict, key: str, digest: str, record: Record, batch: Batch) -> bool:
    """True the first time `key` is seen in the file. A repeat with the same content is skipped
    (counted), one with other content is rejected as duplicate_id (the first one stays)."""
    previous = seen.get(key)
    if previous is None:
        seen[key] = digest
        return True
    if previous == digest:
        batch.duplicates += 1
    else:
        batch.rejects.append(reject(record, DUPLICATE_ID))
    return False


class InteractionMapper:
    """One interaction a row (event logs): position = the row's line, so a user's rows keep
    their file order and a re-ingest of the same file hits the same keys."""

    def __init__(self, user_col: str, item_col: str, time_col: str | None, label_col: str | None,
                 label: Callable[[object], int | None] = parse_label):
        self.cols = (user_col, item_col, time_col, label_col)
        self.label = label

    def __call__(self, record: Record, batch: Batch) -> None:
        user_col, item_col, time_col, label_col = self.cols
        values = record.values
        user, item = _text(values.get(user_col)), _text(values.get(item_col))
        if not user or not item:
            batch.rejects.append(reject(record, MISSING_ID))
            return
        try:
            ts = parse_time(values.get(time_col)) if time_col else None
            label = self.label(values.get(label_col)) if label_col else None
        except ValueError:
            batch.rejects.append(reject(record, BAD_VALUE))
            return
        batch.rows.append((user, item, record.line, ts, label, record.line, record.raw))


class GoodreadsUserMapper:
    """users.jsonl: `history` (oldest first) -> positions 0..k-1, label NULL; `llm_interests`
    -> an imported summary (joined with ", ")."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    def __call__(self, record: Record, batch: Batch) -> None:
        values = record.values
        user = _text(values.get("user_id"))
        history = values.get("history")
        if not user:
            batch.rejects.append(reject(record, MISSING_ID))
            return
        if not isinstance(history, list) or not all(isinstance(i, (str, int)) for i in history):
            batch.rejects.append(reject(record, BAD_VALUE))
            return
        history = [str(i).strip() for i in history]
        if not any(history):
            batch.rejects.append(reject(record, EMPTY_HISTORY))
            return
        if not _first_or_same(self.seen, user, "\x1f".join(history), record, batch):
            return
        for position, item in enumerate(history):
            if item:
                batch.rows.append((user, item, position, None, None, record.line, None))
        interests = values.get("llm_interests")
        keywords = [k for k in map(_text, interests) if k] if isinstance(interests, list) else []
        if keywords:
            batch.summaries.append((user, ", ".join(keywords)))


class MindBehaviorMapper:
    """behaviors.tsv: history clicks -> label 1 at positions 0..k-1 (no time); impressions
    `N1-1 N2-0` -> label 1/0 with the impression time, at positions after the history and
    after the same user's earlier impressions in the file."""

    def __init__(self):
        self.next_position: dict[str, int] = {}

    def __call__(self, record: Record, batch: Batch) -> None:
        values = record.values
        user = _text(values.get("user_id"))
        if not user:
            batch.rejects.append(reject(record, MISSING_ID))
            return
        try:
            ts = parse_time(values.get("time"))
        except ValueError:
            batch.rejects.append(reject(record, BAD_VALUE))
            return
        history = _text(values.get("history")).split()
        for position, item in enumerate(history):
            batch.rows.append((user, item, position, None, 1, record.line, None))
        position = max(len(history), self.next_position.get(user, 0))
        for token in _text(values.get("impressions")).split():
            item, _, label = token.rpartition("-")
            if not item or label not in ("0", "1"):
                batch.rejects.append(reject(record, BAD_VALUE, raw=f"user_id={user} impression {token}"))
                continue
            batch.rows.append((user, item, position, ts, int(label), record.line, None))
            position += 1
        self.next_position[user] = position


def _movielens_item(values: dict) -> dict:
    """RecBole ml-100k.item -> title + a short description from year and genres."""
    genres = ", ".join(_text(values.get("class")).split())
    year = _text(values.get("release_year"))
    parts = [f"{year} film." if year else "", f"Genres: {genres}." if genres else ""]
    return {"item_id": values.get("item_id"), "title": values.get("movie_title"),
            "description": " ".join(p for p in parts if p) or None}


def _rating_label(value) -> int | None:
    """MovieLens ratings 1..5: 4 or 5 is a positive (label 1), 1..3 a shown-not-liked (0)."""
    text = _text(value)
    return None if not text else int(float(text) >= 4)


def _atomic_reader(path: Path) -> DelimitedReader:
    """RecBole atomic file: TSV whose header names are `name:type`."""
    reader = DelimitedReader(path, "\t", quoting=False)
    reader.columns = [c.split(":")[0] for c in reader.columns]
    return reader


# -- planning: command line -> sources ---------------------------------------------------------------
def _pick(columns: list[str], flag: str, given: str | None, candidates: tuple[str, ...],
          path: Path, required: bool) -> str | None:
    if given:
        if given not in columns:
            raise FormatError(f"{path}: no column {given!r} for {flag} (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise FormatError(f"{path}: no {flag.lstrip('-').replace('-col', '')} column among "
                          f"{', '.join(columns)} (name it with {flag})")
    return found


def _generic_reader(path: Path, fmt: str, quoting: bool, batch_size: int):
    if fmt == "tsv":
        return DelimitedReader(path, "\t", quoting=quoting)
    if fmt == "csv":
        return DelimitedReader(path, ",", quoting=quoting)
    if fmt == "jsonl":
        return JsonlReader(path)
    return ParquetReader(path, batch_size)


def _generic_source(path: Path, fmt: str, kind: str, m: Mapping, quoting: bool, batch_size: int) -> Source:
    reader = _generic_reader(path, fmt, quoting, batch_size)
    cols = reader.columns
    if kind == "auto":
        kind = INTERACTIONS if _pick(cols, "--user-col", m.user_col, USER_CANDIDATES, path, False) else ITEMS
    if kind == ITEMS:
        id_col = _pick(cols, "--id-col", m.id_col, ID_CANDIDATES, path, True)
        title = _pick(cols, "--title-col", m.title_col, ("title", "name"), path, False)
        description = _pick(cols, "--description-col", m.description_col,
                            ("description", "text", "abstract", "body"), path, False)
        if not title and not description:
            raise FormatError(f"{path}: no text column (name one with --title-col or --description-col)")
        category = _pick(cols, "--category-col", m.category_col, ("category",), path, False)
        return Source(path, ITEMS, reader, ItemMapper(id_col, title, description, category))
    mapper = InteractionMapper(
        _pick(cols, "--user-col", m.user_col, USER_CANDIDATES, path, True),
        _pick(cols, "--item-col", m.item_col, ITEM_REF_CANDIDATES, path, True),
        _pick(cols, "--time-col", m.time_col, TIME_CANDIDATES, path, False),
        _pick(cols, "--label-col", m.label_col, LABEL_CANDIDATES, path, False),
    )
    return Source(path, INTERACTIONS, reader, mapper)


def _dataset_sources(fmt: str, path: Path) -> list[Source]:
    """A dataset folder (both files) or one of its two files."""
    items_name, inter_name = DATASETS[fmt]
    paths = [path / items_name, path / inter_name] if path.is_dir() else [path]
    for p in paths:
        if not p.exists():
            raise FormatError(f"{path}: expected {p.name} for --format {fmt} (not found)")
        if p.name not in (items_name, inter_name):
            raise FormatError(f"{p}: --format {fmt} reads {items_name} and {inter_name}, not {p.name}")
    sources = []
    for p in paths:
        if fmt == "goodreads" and p.name == items_name:
            sources.append(Source(p, ITEMS, DelimitedReader(p, "\t", quoting=True),
                                  ItemMapper("book_id", "title", "description")))
        elif fmt == "goodreads":
            sources.append(Source(p, INTERACTIONS, JsonlReader(p), GoodreadsUserMapper(), replace_users=True))
        elif fmt == "mind" and p.name == items_name:
            sources.append(Source(p, ITEMS, DelimitedReader(p, "\t", quoting=False, columns=MIND_NEWS_COLUMNS),
                                  ItemMapper("news_id", "title", "abstract", "category")))
        elif fmt == "mind":
            sources.append(Source(p, INTERACTIONS,
                                  DelimitedReader(p, "\t", quoting=False, columns=MIND_BEHAVIOR_COLUMNS),
                                  MindBehaviorMapper()))
        elif p.name == items_name:
            sources.append(Source(p, ITEMS, _atomic_reader(p),
                                  ItemMapper("item_id", "title", "description", transform=_movielens_item)))
        else:
            sources.append(Source(p, INTERACTIONS, _atomic_reader(p),
                                  InteractionMapper("user_id", "item_id", "timestamp", "rating", _rating_label)))
    return sources


def detect_format(path: Path) -> str:
    if path.is_dir():
        for fmt, names in DATASETS.items():
            if all((path / n).exists() for n in names):
                return fmt
        raise FormatError(f"{path}: a folder, but not a goodreads/mind/movielens dataset "
                          f"(expected e.g. {' + '.join(DATASETS['goodreads'])})")
    for fmt, names in DATASETS.items():
        if path.name in names:
            return fmt
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise FormatError(f"{path}: cannot tell the format from the name; pass --format")
    return fmt


def plan_sources(paths: list[str | Path], fmt: str = "auto", kind: str = "auto",
                 mapping: Mapping | None = None, quoting: bool = True, batch_size: int = 5000) -> list[Source]:
    """The sources to ingest, items first (stable otherwise), so that interactions are checked
    against the items this same command brings in."""
    mapping = mapping or Mapping()
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FormatError(f"{path}: no such file or folder")
        this = detect_format(path) if fmt == "auto" else fmt
        if this in DATASETS:
            sources.extend(_dataset_sources(this, path))
        else:
            sources.append(_generic_source(path, this, kind, mapping, quoting, batch_size))
    return sorted(sources, key=lambda s: s.kind != ITEMS)
