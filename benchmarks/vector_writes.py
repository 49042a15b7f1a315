"""DuckDB cost of committing vector chunks: DuckDB's default settings vs `E.bulk_writes`, in one process.

    .venv/bin/python benchmarks/vector_writes.py --db CATALOG [--chunks 24] [--repeats 3]

Writes --chunks chunks of 2,048 rows through `embsum.index.embeddings.write_items` (the precompute
job's write path: Arrow, DELETE + INSERT, one transaction per chunk) into a fresh catalog with
the job's 512 MB DuckDB memory limit, then a final CHECKPOINT. The vectors are the first 2,048
items' real CPE/CPE' vectors from --db (a catalog precomputed by `embsum precompute`), repeated
under new ids. Reported per setting: median seconds, the slowest chunk's commit, file size.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import peak_rss_mb, save, table
from embsum.index import embeddings as E
from embsum.index.catalog import Catalog
from embsum.offline.indexing import model_hashes
from embsum.offline.job_configs import PrecomputeConfig
from embsum.offline.precompute import limit_db_memory

CHUNK = 2048


def real_vectors(db: Path):
    with Catalog(db, read_only=True) as cat:
        hashes = model_hashes(cat)
        if not hashes:
            raise SystemExit(f"{db} holds no item vectors: run `embsum precompute` on it first")
        block = next(E.iterate(cat, hashes[0], E.ITEM, CHUNK))
    return block.vectors["cpe"][:CHUNK], block.vectors["cpe_prime"][:CHUNK]


def write_all(path: Path, cpe, cpe_prime, chunks: int, bulk: bool) -> tuple[float, float, int]:
    _, n, d = cpe.shape
    with Catalog(path) as cat:
        limit_db_memory(cat, PrecomputeConfig())
        sp = E.ensure_space(cat, "b" * 40, E.ITEM, n, d)
        per = []
        t0 = time.perf_counter()
        with E.bulk_writes(cat) if bulk else contextlib.nullcontext():
            for k in range(chunks):
                ids = [f"item{k:04d}-{j:05d}" for j in range(len(cpe))]
                t1 = time.perf_counter()
                with cat.transaction():
                    E.write_items(cat, sp, ids, ids, cpe, cpe_prime)
                per.append(time.perf_counter() - t1)
        cat.con.execute("CHECKPOINT")
        total = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return total, max(per), size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, required=True, help="a catalog holding item vectors (read only)")
    p.add_argument("--chunks", type=int, default=24, help="chunks of 2,048 rows written per run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    cpe, cpe_prime = real_vectors(args.db)
    work = Path(tempfile.mkdtemp(prefix="bench-writes-"))
    results, rows = {}, []
    for label, bulk in (("DuckDB defaults (checkpoint at every chunk, ALP-RD floats)", False),
                        (f"E.bulk_writes {E.BULK_WRITE_SETTINGS}", True)):
        runs = [write_all(work / f"w{r}.duckdb", cpe, cpe_prime, args.chunks, bulk) for r in range(args.repeats)]
        med = statistics.median(r[0] for r in runs)
        results[label] = {"times": [r[0] for r in runs], "median_s": med, "slowest_chunk_s": [r[1] for r in runs],
                          "file_bytes": runs[-1][2]}
        rows.append([label, med, statistics.median(r[1] for r in runs), runs[-1][2] / 1e6])
        print(f"{label}: {med:.2f}s (median of {[round(r[0], 2) for r in runs]})", flush=True)
    base = rows[0][1]
    for r in rows:
        r.append(base / r[1])
    print(f"\n{args.chunks} chunks x {CHUNK} rows of 2x{list(cpe.shape[1:])} floats, peak RSS {peak_rss_mb():.0f} MB\n")
    print(table(["settings", "seconds (median)", "slowest commit s", "file MB", "speed-up"], rows))
    print(f"\nsaved {save('vector_writes', results)}")


if __name__ == "__main__":
    main()
