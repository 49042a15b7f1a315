#!/bin/bash
# The GPU recipe (offline/recipes/goodreads_gpu.toml: goodreads_cpu with the encoder unfrozen) as a
# user runs it on a CUDA machine, each step timed: ingest goodreads into a fresh catalog, a short
# smoke run of the same recipe (so a broken GPU setup fails in a minute, not after the full run),
# `embsum train --recipe goodreads_gpu`, then `embsum evaluate` of its OUT/best on test and dev,
# each with the baselines and a per-user file (--per-user-out) that a CPU machine pairs with its
# own rows (`embsum evaluate --rows-from RESULTS/test.users.npz --checkpoint <cpu model>`).
#
#   bash benchmarks/gpu_recipe.sh                      # WORK=/tmp/embsum-gpu RESULTS=bench-out/gpu-recipe
#   SMOKE=0 RESULTS=$OUT bash benchmarks/gpu_recipe.sh
#
# RESULTS gets at most 8 files: log.txt, test.{json,md,users.npz}, dev.{json,users.npz}, train_state.json
# (the dev curve and losses), model.txt (hash, size, timings); checkpoints stay under WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/embsum-gpu}
RESULTS=${RESULTS:-bench-out/gpu-recipe}
DATA=${DATA:-../shared/data/goodreads}
EMBSUM=${EMBSUM:-embsum}
SMOKE=${SMOKE:-1}
DEVICE=${DEVICE:-cuda}
# extra options (a plumbing check on a small catalog: TRAIN_ARGS="--max-steps 2 ..." DEVICE=cpu)
SMOKE_ARGS=${SMOKE_ARGS:---max-steps 30 --eval-every 0 --dev-users 10 --no-popularity-prior --log-every 10}
TRAIN_ARGS=${TRAIN_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
DB=$WORK/goodreads.duckdb
rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"
export EMBSUM_NO_PROGRESS=1
exec > >(tee "$RESULTS/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
clock() { date +%s.%N; }
since() { python3 -c "print(f'{$(clock) - $1:.1f}')"; }
t=$(clock)
"$EMBSUM" --db "$DB" -q ingest "$DATA" --format goodreads
echo "ingest: $(since "$t") s"
if [ "$SMOKE" = 1 ]; then
    t=$(clock)
    # shellcheck disable=SC2086
    "$EMBSUM" --db "$DB" train --recipe goodreads_gpu --device "$DEVICE" --out "$WORK/smoke" $SMOKE_ARGS \
        2>&1 | tee "$WORK/smoke.log"
    echo "smoke: $(since "$t") s"
    # Speed of steps 11-30 (the loop logs cumulative samples/s; the first steps warm the GPU up).
    # TRAIN_BUDGET_S: when 2,000 steps would not fit in it, train as many steps as fit (a multiple
    # of the recipe's eval_every, 250), said so in the log: a shorter schedule, not the recipe.
    step_s=$(python3 - "$WORK/smoke.log" <<'PY'
import re, sys
seen = {int(s): float(r) for s, r in re.findall(r"step (\d+)/\d+ .*samples/s ([0-9.]+)", open(sys.argv[1]).read())}
(a, ra), (b, rb) = sorted(seen.items())[-2:]
print(f"{(32 * b / rb - 32 * a / ra) / (b - a):.4f}")
PY
)
    projected=$(python3 -c "print(round(2000 * $step_s))")
    echo "smoke: $step_s s per step of 32 after warm-up: 2,000 steps take ~$projected s (budget ${TRAIN_BUDGET_S:-none})"
    if [ -n "${TRAIN_BUDGET_S:-}" ] && [ "$projected" -gt "$TRAIN_BUDGET_S" ]; then
        steps=$(python3 -c "print(max(250, int($TRAIN_BUDGET_S / $step_s) // 250 * 250))")
        echo "SHORTER SCHEDULE: --max-steps $steps (2,000 do not fit in $TRAIN_BUDGET_S s)"
        TRAIN_ARGS="$TRAIN_ARGS --max-steps $steps"
    fi
fi
t=$(clock)
# shellcheck disable=SC2086
"$EMBSUM" --db "$DB" train --recipe goodreads_gpu --device "$DEVICE" --out "$WORK/gpu" $TRAIN_ARGS
train_s=$(since "$t")
echo "train: $train_s s"
cp "$WORK/gpu/last/trainer_state.json" "$RESULTS/train_state.json"
for split in test dev; do
    t=$(clock)
    # shellcheck disable=SC2086
    "$EMBSUM" --db "$DB" evaluate --checkpoint "$WORK/gpu/best" --split "$split" --device "$DEVICE" \
        --report "$RESULTS/$split.json" --per-user-out "$RESULTS/$split.users.npz" $EVAL_ARGS
    echo "evaluate $split: $(since "$t") s"
done
rm -f "$RESULTS/dev.md"  # the JSON holds the same figures (RESULTS stays within 8 files)
{ echo "hash $(cat "$WORK/gpu/best/hash")"; echo "train_s $train_s"; du -sh "$WORK/gpu/best"; } > "$RESULTS/model.txt"
cat "$RESULTS/model.txt"
