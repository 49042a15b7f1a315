"""Streaming record readers: TSV/CSV, JSONL and Parquet files -> `Record`s with line numbers.

A record either carries its values (a dict column -> value) or the reason it is unusable
(`invalid_utf8`, `wrong_column_count`, `bad_json`, ...). Readers never stop at a bad row: the
row becomes a reject and the next one is read. Only a file that cannot be read at all (missing,
a directory, no header, not Parquet) raises `FormatError`, which the CLI prints as one line.

Lines are counted the way an editor shows them: 1-based physical lines, header included; a
quoted field spanning lines gives its record the line where it starts. Parquet rows have no
lines: their 1-based row number is used instead.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embsum.offline.errors import UserError

# Why a row was rejected (the `rejects.reason` values; stable names, tests and `info` use them).
MISSING_ID = "missing_id"
EMPTY_TEXT = "empty_text"
DUPLICATE_ID = "duplicate_id"  # same id, different content, in one file
INVALID_UTF8 = "invalid_utf8"
WRONG_COLUMN_COUNT = "wrong_column_count"
UNKNOWN_ITEM = "unknown_item"  # an interaction names an item the catalog does not hold
BAD_JSON = "bad_json"
BAD_VALUE = "bad_value"  # unparseable time, label, rating or list field
BAD_QUOTING = "bad_quoting"  # an opened quote that never closes (past either limit below)
FIELD_TOO_LARGE = "field_too_large"  # one field on one line longer than MAX_FIELD_CHARS

# Limits, read at iteration time (tests lower them). The longest field (characters): big
# enough for any real description (a 5 MB one is fine). The most physical lines one quoted
# record may span: a runaway quote is rejected as bad_quoting after that many lines instead of
# swallowing up to MAX_FIELD_CHARS of the rows after it.
MAX_FIELD_CHARS = min(64 << 20, sys.maxsize)
MAX_RECORD_LINES = 10_000
# A reject keeps this much of its row (a field_too_large row would otherwise store it all).
MAX_RAW_CHARS = 10_000


class FormatError(UserError):
    """The file cannot be read as the requested format: one clear line for the user (exit 1)."""


@dataclass
class Record:
    line: int
    raw: str
    values: dict | None = None
    error: str | None = None


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise FormatError(f"{path} is a directory (pass --format goodreads/mind/movielens for a dataset folder)") from None
    except OSError as err:
        raise FormatError(f"cannot read {path}: {err.strerror or err}") from None


def _decoded_lines(fh, state: dict) -> Iterator[str]:
    """Physical lines as text; records in `state` the line numbers and texts consumed since the
    last reset and whether one was not valid UTF-8 (replaced, so parsing can go on)."""
    for number, data in enumerate(fh, 1):
        data = data.rstrip(b"\r\n")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            state["bad_utf8"] = True
        state["lines"].append(number)
        state["text"].append(text)
        yield text


class DelimitedReader:
    """TSV/CSV. `columns=None` reads them from the header line; else the file has no header
    (MIND). `quoting=False` splits on the delimiter only (MIND, where quotes are literal);
    `quoting=True` follows the CSV dialect (a field opening with `"` may hold delimiters, doubled
    quotes and newlines: the Goodreads books.tsv writes its fields that way)."""

    def __init__(self, path: str | Path, delimiter: str = "\t", quoting: bool = True,
                 columns: list[str] | None = None):
        self.path = Path(path)
        self.delimiter = delimiter
        self.quoting = quoting
        self._given = columns
        self.columns = list(columns) if columns is not None else self._read_header()

    def _split(self, lines: Iterator[str], state: dict | None = None) -> Iterator[list[str]]:
        if not self.quoting:
            return (line.split(self.delimiter) for line in lines)
        # The limit is process-wide state of the csv module (default 128 KiB): set it each time.
        csv.field_size_limit(MAX_FIELD_CHARS)
        return csv.reader(_with_line_ends(lines, state), delimiter=self.delimiter, quotechar='"',
                          doublequote=True, strict=False)

    def _read_header(self) -> list[str]:
        with _open_binary(self.path) as fh:
            first = fh.readline()
        try:
            text = first.rstrip(b"\r\n").decode("utf-8-sig")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: header line is not UTF-8 text (wrong format?)") from None
        header = [c.strip() for c in next(self._split(iter([text])), [])]
        if not any(header):
            raise FormatError(f"{self.path}: empty file or empty header line")
        if len(header) < 2:
            raise FormatError(f"{self.path}: header has one column {header[0][:60]!r}; "
                              f"is the delimiter {self.delimiter!r} right?")
        return header

    def __iter__(self) -> Iterator[Record]:
        state: dict = {"lines": [], "text": [], "bad_utf8": False}
        with _open_binary(self.path) as fh:
            lines = _decoded_lines(fh, state)
            if self._given is None:
                next(lines, None)  # the header, read by _read_header
            self._reset(state)
            rows = self._split(lines, state)
            width = len(self.columns)
            while True:
                try:
                    fields = next(rows)
                except StopIteration:
                    return
                except csv.Error:
                    yield self._take(state, None, _csv_error_reason(state["text"]))
                    rows = self._split(lines, state)  # the csv reader is unusable after an error
                    continue
                if fields == [] or fields == [""]:
                    self._reset(state)  # blank line
                    continue
                if state["bad_utf8"]:
                    yield self._take(state, fields, INVALID_UTF8)
                elif not self.quoting and max(map(len, fields)) > MAX_FIELD_CHARS:  # no csv limit here
                    yield self._take(state, None, FIELD_TOO_LARGE)
                elif len(fields) != width:
                    yield self._take(state, fields, WRONG_COLUMN_COUNT)
                else:
                    yield self._take(state, fields, None)

    @staticmethod
    def _reset(state: dict) -> None:
        state["lines"].clear()
        state["text"].clear()
        state["bad_utf8"] = False

    def _take(self, state: dict, fields: list[str] | None, error: str | None) -> Record:
        line = state["lines"][0] if state["lines"] else 0
        raw = "\n".join(state["text"])
        self._reset(state)
        if error:
            if len(raw) > MAX_RAW_CHARS:
                raw = f"{raw[:MAX_RAW_CHARS]}... ({len(raw)} characters in all)"
            return Record(line, raw, error=error)
        return Record(line, raw, values=dict(zip(self.columns, fields)))


def _with_line_ends(lines: Iterator[str], state: dict | None) -> Iterator[str]:
    """Lines for csv, their ends put back (a newline inside a quoted field is kept); stops a
    record that spans more than MAX_RECORD_LINES lines (the lines in `state`) with csv.Error."""
    for line in lines:
        if state is not None and len(state["lines"]) > MAX_RECORD_LINES:
            raise csv.Error(f"a quoted field runs over {MAX_RECORD_LINES} lines")
        yield line + "\n"


def _csv_error_reason(lines: list[str]) -> str:
    """Why csv gave up on the record made of `lines`: a physical line longer than the field
    limit is one field too large (quoted or not); otherwise a quote opened and never closed
    (it ran over several lines past the limit) or csv found the quoting broken."""
    return FIELD_TOO_LARGE if any(len(line) > MAX_FIELD_CHARS for line in lines) else BAD_QUOTING


class JsonlReader:
    """One JSON object per line; `columns` are the keys of the first object (for mapping)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns = self._peek_columns()

    def _peek_columns(self) -> list[str]:
        with _open_binary(self.path) as fh:
            for data in fh:
                if data.strip():
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise FormatError(f"{self.path}: first line is not JSON (wrong format?)") from None
                    if not isinstance(obj, dict):
                        raise FormatError(f"{self.path}: expected one JSON object per line")
                    return list(obj)
        raise FormatError(f"{self.path}: empty file")

    def __iter__(self) -> Iterator[Record]:
        with _open_binary(self.path) as fh:
            for line, data in enumerate(fh, 1):
                data = data.rstrip(b"\r\n")
                if not data.strip():
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(line, data.decode("utf-8", errors="replace"), error=INVALID_UTF8)
                    continue
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    yield Record(line, text, error=BAD_JSON)
                    continue
                yield Record(line, text, values=obj)


class ParquetReader:
    """Parquet row groups streamed in batches; rows numbered from 1."""

    def __init__(self, path: str | Path, batch_size: int = 10_000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.batch_size = batch_size
        try:
            self._file = pq.ParquetFile(self.path)
        except FileNotFoundError:
            raise FormatError(f"cannot read {self.path}: no such file") from None
        except (pa.ArrowException, OSError, ValueError) as err:
            raise FormatError(f"{self.path} is not a readable Parquet file: {err}") from None
        self.columns = list(self._file.schema_arrow.names)

    def __iter__(self) -> Iterator[Record]:
        row = 0
        for batch in self._file.iter_batches(batch_size=self.batch_size):
            for values in batch.to_pylist():
                row += 1
                yield Record(row, json.dumps(values, default=str, ensure_ascii=False), values=values)
