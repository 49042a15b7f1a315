#!/bin/bash
# The whole CPU recipe as a user runs it (README, "Training and evaluation"), each step timed:
# ingest goodreads into a fresh catalog, `embsum train --recipe goodreads_cpu`, then
# `embsum align --recipe align_cpu` of its OUT/best. Issue 14 budgets train + align at 60 minutes
# on 2 idle cores; run it on an idle machine.
#
#   bash benchmarks/cpu_recipe_time.sh                 # DB=/tmp/embsum-recipe/goodreads.duckdb OUT=bench-out/recipe-time
#   DB=/tmp/x.duckdb OUT=bench-out/x bash benchmarks/cpu_recipe_time.sh
#   TRAIN_ARGS="--max-steps 1750" bash benchmarks/cpu_recipe_time.sh   # a recipe change, timed before it lands
#
# The catalog and its token-state store (<db>.states/) are deleted first, so train encodes the
# catalog and align reads what train stored (EMBSUM_TOKEN_STATES=off times the flow without it).
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${DB:-/tmp/embsum-recipe/goodreads.duckdb}
OUT=${OUT:-bench-out/recipe-time}
DATA=${DATA:-../shared/data/goodreads}
EMBSUM=${EMBSUM:-.venv/bin/embsum}
TRAIN_ARGS=${TRAIN_ARGS:-}  # extra `embsum train` options, word-split
ALIGN_ARGS=${ALIGN_ARGS:-}  # extra `embsum align` options, word-split
rm -rf "$DB" "$DB".* "$OUT"
mkdir -p "$(dirname "$DB")" "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)"
grep -o -w -E "avx2|avx512f|avx512_bf16|amx_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
t0=$(date +%s)
/usr/bin/time -f "ingest: %e s, peak RSS %M KB" "$EMBSUM" --db "$DB" ingest "$DATA" --format goodreads
t1=$(date +%s)
EMBSUM_NO_PROGRESS=1 /usr/bin/time -f "train: %e s, peak RSS %M KB" \
    "$EMBSUM" --db "$DB" train --recipe goodreads_cpu --out "$OUT/sft" $TRAIN_ARGS
t2=$(date +%s)
EMBSUM_NO_PROGRESS=1 /usr/bin/time -f "align: %e s, peak RSS %M KB" \
    "$EMBSUM" --db "$DB" align --checkpoint "$OUT/sft/best" --recipe align_cpu --out "$OUT/align" $ALIGN_ARGS
t3=$(date +%s)
echo "ingest $((t1 - t0)) s, train $((t2 - t1)) s, align $((t3 - t2)) s; train + align $((t3 - t1)) s" \
     "($(( (t3 - t1) / 60 )) min $(( (t3 - t1) % 60 )) s; budget 60 min)"
