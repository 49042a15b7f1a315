"""MovieLens-100K holdout catalogs: the test holdout and the dev holdouts that recipe choices use.

    .venv/bin/python benchmarks/movielens_holdouts.py --out /tmp/mlho --depth 3

Depth d holds out each user's d-th-to-last positive (by time: the catalog's history order) as its
target and trains on the catalog without the user's last d positives:

    depth 1 (test):  train on <out>/trunc1.duckdb, targets <out>/targets1.tsv, evaluate on <out>/ml.duckdb
    depth 2 (dev 1): train on <out>/trunc2.duckdb, targets <out>/targets2.tsv, evaluate on <out>/trunc1.duckdb
    depth 3 (dev 2): train on <out>/trunc3.duckdb, targets <out>/targets3.tsv, evaluate on <out>/trunc2.duckdb

so a model is always scored on the catalog one step longer than the one it learned from (the
target's own row is the only thing it never saw), with the evaluation's input history the positives
before the target (`embsum evaluate --holdout`, protocol holdout-v1). A truncated catalog leaves out
each such user's every row from its target on (by time, then file position): the later positives,
and the later dislikes too, so nothing after the target (an explicit dislike that RoDPO's
`dislike_share` could learn from) reaches training. Other users' rows all stay. Every catalog is
a fresh `embsum ingest --format movielens` of the demo's ml-100k files (`embsum demo`'s cache) with
those rows left out, so the item table is the same in all of them. Users with fewer than d positives get no depth-d target. Files that exist
are kept (delete them to rebuild).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ingest(folder: Path, db: Path) -> None:
    """A fresh catalog at `db` from an ml-100k folder, written under a temp name and renamed."""
    tmp = db.with_name(db.name + ".tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "embsum.offline.cli", "--db", str(tmp), "-q", "ingest", "--format",
                    "movielens", str(folder)], check=True, cwd=ROOT)
    tmp.rename(db)


def held_out(histories: dict[str, list[str]], depth: int) -> dict[str, list[str]]:
    """user -> its last `depth` positives (oldest first); users with fewer positives hold out none."""
    return {u: h[-depth:] for u, h in histories.items() if len(h) >= depth}


def rows_from(rows: list[tuple[str, str, object, int]], targets: dict[str, str]) -> set[tuple[str, str]]:
    """The (user, item) rows of each user of `targets` from its target on, in the catalog's order
    (time, rows without a time first, then position), the target included. `rows`: (user, item, ts,
    position) of every interaction."""
    def order(ts, position):
        return (ts is not None, ts or 0, position)

    start = {(u, i): order(ts, pos) for u, i, ts, pos in rows if targets.get(u) == i}
    return {(u, i) for u, i, ts, pos in rows if u in targets and order(ts, pos) >= start[(u, targets[u])]}


def write_truncated_folder(source: Path, target: Path, drop: set[tuple[str, str]]) -> int:
    """ml-100k files at `target`: the item file as it is, the interaction file without the (user,
    item) rows in `drop` (rows kept in file order). Returns how many rows were left out."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "ml-100k.item", target / "ml-100k.item")
    dropped = 0
    with open(source / "ml-100k.inter", newline="") as src, open(target / "ml-100k.inter", "w", newline="") as dst:
        header = src.readline()
        dst.write(header)
        for line in src:
            user, item = line.split("\t", 2)[:2]
            if (user, item) in drop:
                dropped += 1
                continue
            dst.write(line)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the catalogs and target files")
    parser.add_argument("--depth", type=int, default=3, help="build depths 1..DEPTH (1: test, 2 and 3: dev)")
    parser.add_argument("--data", default=None, help="ml-100k folder or recbole wheel (default: the demo's cache)")
    args = parser.parse_args()

    import duckdb
    from embsum.index.catalog import Catalog
    from embsum.offline.commands.demo import default_cache, fetch_movielens

    folder = fetch_movielens(args.data, default_cache())
    args.out.mkdir(parents=True, exist_ok=True)
    full = args.out / "ml.duckdb"
    if not full.exists():
        ingest(folder, full)
    with Catalog(full, read_only=True) as cat:
        histories = cat.histories()  # the order "last" means; rows_from orders the same way
    with duckdb.connect(str(full), read_only=True) as con:
        rows = con.execute("SELECT user_id, item_id, epoch(ts), position FROM interactions").fetchall()
    for depth in range(1, args.depth + 1):
        last = held_out(histories, depth)
        targets = args.out / f"targets{depth}.tsv"
        if not targets.exists():
            with open(targets.with_suffix(".tmp"), "w", newline="") as fh:
                writer = csv.writer(fh, delimiter="\t")
                writer.writerow(["user", "item"])
                writer.writerows((u, items[0]) for u, items in sorted(last.items()))
            targets.with_suffix(".tmp").rename(targets)
        db = args.out / f"trunc{depth}.duckdb"
        if not db.exists():
            work = args.out / f"ml-100k-minus{depth}"
            dropped = write_truncated_folder(folder, work, rows_from(rows, {u: items[0] for u, items in last.items()}))
            ingest(work, db)
            shutil.rmtree(work)
            print(f"depth {depth}: {len(last)} users, {dropped} rows left out (their targets and every later row) -> {db}")
        evaluate_on = full if depth == 1 else args.out / f"trunc{depth - 1}.duckdb"
        print(f"depth {depth}: train on {db}, evaluate with --holdout {targets} on {evaluate_on}")


if __name__ == "__main__":
    main()
