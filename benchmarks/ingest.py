"""Goodreads ingest throughput vs a plain DuckDB reader of the same file, in the same run.

    .venv/bin/python benchmarks/ingest.py [--data ../shared/data/goodreads] [--repeats 5]

Each figure is the median of --repeats runs into a fresh DuckDB file (written to a temp
folder). The embsum side is the ingest job itself (embsum.offline.ingest.job.ingest: parse, validate
every row, upsert with per-batch transactions, users' history hashes, imported summaries,
rejects); the baseline is the bare DuckDB reader loading the same file into a table
(`read_csv` for books.tsv; `read_json` + unnest for users.jsonl), no validation. The ratio
says what the checks and the upsert semantics cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb
from embsum.index.catalog import Catalog
from embsum.offline.ingest.job import IngestConfig, ingest


def median_time(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.duckdb"
            if setup:
                setup(db)
            start = time.perf_counter()
            fn(db)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def embsum_ingest(paths, fmt="goodreads", batch_size=5000):
    def run(db):
        with Catalog(db) as cat:
            ingest(cat, paths, IngestConfig(format=fmt, batch_size=batch_size))
    return run


# The plain DuckDB loads of each file: no validation, no upsert, one statement.
BOOKS_SQL = ("CREATE TABLE items AS SELECT * FROM read_csv(?, delim='\t', header=true, quote='\"', "
             "all_varchar=true)")
USERS_SQL = ("CREATE TABLE interactions AS SELECT user_id, unnest(history) AS item_id, "
             "generate_subscripts(history, 1) - 1 AS position FROM read_json(?)")


def duckdb_load(sql: str, path: Path):
    def run(db):
        con = duckdb.connect(str(db))
        con.execute(sql, [str(path)])
        con.close()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "goodreads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    books, users = args.data / "books.tsv", args.data / "users.jsonl"
    if not books.exists():
        sys.exit(f"Goodreads data not found at {args.data} (pass --data)")

    # Row counts from the plain reader (what both sides load).
    con = duckdb.connect()
    n_books = con.execute("SELECT count(*) FROM read_csv(?, delim='\t', header=true, quote='\"')",
                          [str(books)]).fetchall()[0][0]
    n_inter = con.execute("SELECT sum(len(history)) FROM read_json(?)", [str(users)]).fetchall()[0][0]
    con.close()

    load_books = embsum_ingest([books], batch_size=args.batch_size)
    rows = [
        ("books.tsv -> items", n_books,
         median_time(load_books, args.repeats), median_time(duckdb_load(BOOKS_SQL, books), args.repeats)),
        ("users.jsonl -> interactions", n_inter,
         median_time(embsum_ingest([users], batch_size=args.batch_size), args.repeats, setup=load_books),
         median_time(duckdb_load(USERS_SQL, users), args.repeats)),
    ]
    both = embsum_ingest([args.data], batch_size=args.batch_size)
    full = median_time(both, args.repeats)
    again = median_time(both, args.repeats, setup=both)  # re-ingest: everything unchanged

    print(f"Goodreads ingest, median of {args.repeats} runs, fresh DuckDB file each "
          f"(batch size {args.batch_size}, duckdb {duckdb.__version__})")
    print(f"{'file':<30}{'rows':>9}{'embsum s':>10}{'rows/s':>11}{'duckdb s':>10}{'rows/s':>11}{'ratio':>7}")
    for name, n, ours, base in rows:
        print(f"{name:<30}{n:>9,}{ours:>10.3f}{n / ours:>11,.0f}{base:>10.3f}{n / base:>11,.0f}"
              f"{ours / base:>6.1f}x")
    total = n_books + n_inter
    print(f"{'whole folder (both files)':<30}{total:>9,}{full:>10.3f}{total / full:>11,.0f}")
    print(f"{'re-ingest, nothing changed':<30}{total:>9,}{again:>10.3f}{total / again:>11,.0f}")


if __name__ == "__main__":
    main()
