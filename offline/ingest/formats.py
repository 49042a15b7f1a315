"""What each input format means: records (offline/ingest/records.py) -> catalog rows + rejects.

A `Source` is one file read as items or interactions; `plan_sources()` turns the command line
(paths, --format, --kind, column flags) into the ordered list of sources to ingest: every
items file before any interactions file, so that interactions are checked against the items
the same command brings in.

Formats:
- tsv / csv / jsonl / parquet: one row per item or per interaction, columns by mapping flags or
  found by name (case and `_`/`-`/space insensitive: `userId`, `user_id` and `UserID` match).
  An interaction's label is a 0/1 label column, or a rating column thresholded at
  --positive-from (>= it: label 1; below: label 0, an explicit dislike), or none (a positive).
- goodreads (folder): books.tsv (items) + users.jsonl (a user's whole history a line; the
  history replaces the stored one; llm_interests are imported as summaries).
- mind (folder or the two files): news.tsv (items) + behaviors.tsv (history clicks as label 1,
  then impressions with labels 1/0 and the impression time).
- movielens (folder): MovieLens-100K as RecBole atomic files ml-100k.item / ml-100k.inter
  (the files inside the recbole wheel): through the same `RatingLabel` as --rating-col, so
  rating >= 4 is label 1, below is label 0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embsum.offline.ingest.records import (
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
# Column names tried, in order, when no mapping flag names one. Compared by their normalised
# spelling (`normalise_column`), so `userId`, `UserID`, `user-id` and `user_id` are one name.
ID_CANDIDATES = ("item_id", "id", "book_id", "news_id", "movie_id", "product_id")
TITLE_CANDIDATES = ("title", "name")
DESCRIPTION_CANDIDATES = ("description", "text", "abstract", "body")
CATEGORY_CANDIDATES = ("category",)
USER_CANDIDATES = ("user_id", "user", "uid", "customer_id", "member_id")
ITEM_REF_CANDIDATES = ("item_id", "item", "iid", "book_id", "news_id", "movie_id", "product_id")
TIME_CANDIDATES = ("ts", "time", "timestamp", "datetime", "date")
LABEL_CANDIDATES = ("label", "clicked", "click")
RATING_CANDIDATES = ("rating", "stars")

DEFAULT_POSITIVE_FROM = 4.0  # MovieLens/Goodreads 1-5 stars: 4 and 5 are a like
# Rows read before anything is written to check that a label column holds labels.
LABEL_SAMPLE_ROWS = 1000


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
    label_col: str | None = field(default=None, metadata={"help": "0/1 label column."})
    rating_col: str | None = field(
        default=None, metadata={"help": "Rating column; its labels come from positive_from."})
    positive_from: float = field(
        default=DEFAULT_POSITIVE_FROM,
        metadata={"help": "A rating >= this is a positive (label 1); below, an explicit dislike (label 0)."})

    def __post_init__(self):
        if self.label_col and self.rating_col:
            raise ValueError("give --label-col or --rating-col, not both (a rating column makes the labels)")
        if not math.isfinite(self.positive_from):
            raise ValueError(f"positive_from must be a finite number, got {self.positive_from}")


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
    notes: list[str] = field(default_factory=list)  # choices made for the user, printed and logged

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


@dataclass(frozen=True)
class RatingLabel:
    """Rating -> label, the one mapping for --rating-col and the MovieLens reader: a rating
    >= positive_from is a positive (1), below it an explicit dislike (0, stored: a shown and
    disliked item is a negative, not a missing one); empty -> None (an unrated interaction, a
    positive like any row without a label); not a number -> ValueError (a bad_value reject)."""

    positive_from: float = DEFAULT_POSITIVE_FROM

    def __call__(self, value) -> int | None:
        text = _text(value)
        if not text:
            return None
        rating = float(text)
        if not math.isfinite(rating):
            raise ValueError(f"rating {value!r} is not a finite number")
        return int(rating >= self.positive_from)

    def note(self, column: str) -> str:
        return f"rating column {column!r} -> positive from {self.positive_from:g} (--positive-from)"


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


def _atomic_reader(path: Path) -> DelimitedReader:
    """RecBole atomic file: TSV whose header names are `name:type`."""
    reader = DelimitedReader(path, "\t", quoting=False)
    reader.columns = [c.split(":")[0] for c in reader.columns]
    return reader


# -- planning: command line -> sources ---------------------------------------------------------------
def normalise_column(name) -> str:
    """A column name as matched: lowercase, without `_`, `-` or spaces (`userId` == `user_id`)."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def _find(columns: list[str], names) -> str | None:
    """The file's spelling of the first of `names` it has (normalised match)."""
    present: dict[str, str] = {}
    for column in columns:
        present.setdefault(normalise_column(column), column)
    return next((present[n] for n in map(normalise_column, names) if n in present), None)


def _listing(columns: list[str], most: int = 30) -> str:
    shown = ", ".join(columns[:most])
    return shown + (f", ... ({len(columns)} columns)" if len(columns) > most else "")


def _pick(columns: list[str], flag: str, given: str | None, candidates: tuple[str, ...], path: Path) -> str | None:
    """The column `flag` names (its exact spelling, else the same normalised one), else the
    first of `candidates` present; None when it names none and none is present."""
    if not given:
        return _find(columns, candidates)
    found = given if given in columns else _find(columns, (given,))
    if found is None:
        raise FormatError(f"{path}: no column {given!r} for {flag} (columns: {_listing(columns)})")
    return found


def _require(columns: list[str], flag: str, given: str | None, candidates: tuple[str, ...], path: Path,
             other_kind: str = "") -> str:
    found = _pick(columns, flag, given, candidates, path)
    if found is None:
        what = flag.lstrip("-").replace("-col", "")
        raise FormatError(f"{path}: no {what} column among {_listing(columns)} (name it with {flag}{other_kind})")
    return found


def _guess_kind(columns: list[str], m: Mapping) -> str:
    """--kind auto, from the columns this file has (a flag counts where its column is here: one
    command may bring items and interactions): a user column means interactions, a text column
    items; neither, but a rating/label/time column: interactions (so that a missing column is
    reported with --user-col/--item-col, not --id-col); else items."""
    def has(given: str | None, candidates: tuple[str, ...]) -> bool:
        return _find(columns, (given,) if given else candidates) is not None

    if has(m.user_col, USER_CANDIDATES):
        return INTERACTIONS
    if has(m.title_col, TITLE_CANDIDATES) or has(m.description_col, DESCRIPTION_CANDIDATES):
        return ITEMS
    if has(m.rating_col, RATING_CANDIDATES) or has(m.label_col, LABEL_CANDIDATES) or has(m.time_col, TIME_CANDIDATES):
        return INTERACTIONS
    return ITEMS


def _sample(reader, column: str, rows: int = LABEL_SAMPLE_ROWS) -> list[str]:
    """The non-empty values of `column` in the first `rows` records (read before anything is
    written, so that a wrong column is refused instead of half-ingested)."""
    records = iter(reader)
    try:
        values = [_text(r.values.get(column)) for r in itertools.islice(records, rows) if r.values is not None]
    finally:
        if hasattr(records, "close"):
            records.close()  # the reader's file
    return [v for v in values if v]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_labels(reader, column: str, path: Path, positive_from: float) -> None:
    """Refuse a label column whose sampled values are mostly not 0/1 (a rating column given as
    --label-col would lose most rows as bad_value and keep the 1-star ones as positives). A few
    bad values are not refused: those rows become bad_value rejects."""
    values = _sample(reader, column)
    bad = [v for v in values if v.lower() not in _LABELS]
    if 2 * len(bad) <= len(values):
        return
    examples = ", ".join(list(dict.fromkeys(bad))[:3])
    hint = (f"looks like ratings: use --rating-col {column} --positive-from {positive_from:g}"
            if 2 * sum(map(_is_number, bad)) > len(bad) else "labels must be 0/1 (or true/false, yes/no)")
    raise FormatError(f"{path}: label column {column!r} is not 0/1 (e.g. {examples}); {hint}")


def _check_ratings(reader, column: str, path: Path, rating: RatingLabel) -> None:
    """Refuse a 'rating' column that holds only 0/1 when the threshold would make every row a
    dislike: it is a label column."""
    numbers = {float(v) for v in _sample(reader, column) if _is_number(v)}
    if numbers and numbers <= {0.0, 1.0} and rating.positive_from > 1:
        raise FormatError(f"{path}: rating column {column!r} holds only 0/1, so with --positive-from "
                          f"{rating.positive_from:g} every row would be a dislike; use --label-col {column}")


def _label_mapping(reader, m: Mapping, path: Path) -> tuple[str | None, Callable, list[str]]:
    """(column, value -> label, notes) for an interactions file: --rating-col; else a 0/1 label
    column (--label-col or by name); else a rating column found by name, used with
    --positive-from and said so (never every rating a positive); else none (all positives)."""
    cols = reader.columns
    rating_col = _pick(cols, "--rating-col", m.rating_col, (), path)
    if rating_col is None:
        label_col = _pick(cols, "--label-col", m.label_col, LABEL_CANDIDATES, path)
        if label_col is not None:
            _check_labels(reader, label_col, path, m.positive_from)
            return label_col, parse_label, []
        rating_col = _find(cols, RATING_CANDIDATES)
        if rating_col is None:
            return None, parse_label, []
    rating = RatingLabel(m.positive_from)
    _check_ratings(reader, rating_col, path, rating)
    return rating_col, rating, [rating.note(rating_col)]


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
    other_kind = ""
    if kind == "auto":
        kind = _guess_kind(cols, m)
        if kind == ITEMS:
            other_kind = "; for interactions: --kind interactions --user-col NAME --item-col NAME"
    if kind == ITEMS:
        id_col = _require(cols, "--id-col", m.id_col, ID_CANDIDATES, path, other_kind)
        title = _pick(cols, "--title-col", m.title_col, TITLE_CANDIDATES, path)
        description = _pick(cols, "--description-col", m.description_col, DESCRIPTION_CANDIDATES, path)
        if not title and not description:
            raise FormatError(f"{path}: no text column among {_listing(cols)} (name one with --title-col or "
                              f"--description-col{other_kind})")
        category = _pick(cols, "--category-col", m.category_col, CATEGORY_CANDIDATES, path)
        return Source(path, ITEMS, reader, ItemMapper(id_col, title, description, category))
    user = _require(cols, "--user-col", m.user_col, USER_CANDIDATES, path)
    item = _require(cols, "--item-col", m.item_col, ITEM_REF_CANDIDATES, path)
    time = _pick(cols, "--time-col", m.time_col, TIME_CANDIDATES, path)
    label_col, label, notes = _label_mapping(reader, m, path)
    return Source(path, INTERACTIONS, reader, InteractionMapper(user, item, time, label_col, label), notes=notes)


def _dataset_sources(fmt: str, path: Path, positive_from: float = DEFAULT_POSITIVE_FROM) -> list[Source]:
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
            rating = RatingLabel(positive_from)
            sources.append(Source(p, INTERACTIONS, _atomic_reader(p),
                                  InteractionMapper("user_id", "item_id", "timestamp", "rating", rating),
                                  notes=[rating.note("rating")]))
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
            sources.extend(_dataset_sources(this, path, mapping.positive_from))
        else:
            sources.append(_generic_source(path, this, kind, mapping, quoting, batch_size))
    return sorted(sources, key=lambda s: s.kind != ITEMS)
