#!/usr/bin/env bash
# One self-contained device call of toy-model training: nothing is read from an earlier call's files
# on the machine, and everything the next call needs comes back in $OUT before this one ends.
#   bash bench/toy_train_call.sh $OUT AT_STEP TOTAL_STEPS
# It starts from the transformer in the working tree (src/characonsist/toy/weights/transformer: the shipped one,
# or the weights the last call returned, unpacked there), counts on from step AT_STEP of a schedule of
# TOTAL_STEPS (learning rate, data and noise draws), trains for MINUTES, exports the EMA, and runs the quick checks.
# Back in $OUT: weights.tar.* (the exported transformer folder: `cat weights.tar.* | tar xf - -C
# src/characonsist/toy/weights` continues from it), train.log, state.json (the step reached), checks.json.
# The optimizer's moments are rebuilt in each call (--rewarm); the EMA starts at the carried weights.
# ARGS: training options for the recipe, the same in every call, e.g.
#   ARGS="--reference-frac 0.5 --two-character-every 3"
# Carry .whl (diffusers 0.42.1, importlib_metadata 10.2.0, lazy_importer 0.1.0; bench/table_wheels.sh).
set -u
OUT=${1:?output folder}
AT=${2:?the step the carried weights were trained to (0 for the shipped model)}
TOTAL=${3:?total steps of the schedule}
MINUTES=${MINUTES:-7.5}          # the training command's own budget, data rendering included (it saves before)
LR=${LR:-4e-4}
ARGS=${ARGS:-}
DEVICE=${DEVICE:-cuda}
CHECKS=${CHECKS:-in_context,correspondence,copy}
CHECK_N=${CHECK_N:-96}
LIMIT=${LIMIT:-585}              # seconds this script may take in all (the device call's limit is 600)
T0=$(date +%s)
source bench/gpu_env.sh
RUN=$(mktemp -d /tmp/toy-run.XXXX)
W=src/characonsist/toy/weights
quiet() { grep -v -e Warning -e Loading -e "should be kept in float32" | cut -c1-300; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
REWARM=0
[ "$AT" -gt 0 ] && REWARM=200
python3 -m characonsist.toy.train --out "$RUN" --stage init --vae-from $W/vae --transformer-from $W/transformer \
    --at-step "$AT" $ARGS 2>&1 | quiet
timeout $((LIMIT - 150)) python3 -m characonsist.toy.train --out "$RUN" --stage transformer --precision bf16 \
    --steps "$TOTAL" --minutes "$MINUTES" --lr "$LR" --rewarm $REWARM $ARGS 2>&1 | quiet
python3 -m characonsist.toy.train --out "$RUN" --stage export --weights "$RUN/export" 2>&1 | quiet
cp "$RUN/train.log" "$RUN/state.json" "$OUT"/
tar cf - -C "$RUN/export" transformer | split -b 15m - "$OUT"/weights.tar.
left=$((LIMIT - ($(date +%s) - T0) - 5))
echo "checks: ${left} s left"
[ $left -gt 20 ] && timeout $left python3 -m characonsist.toy.checks --model-dir "$RUN/export" --device "$DEVICE" \
    --only "$CHECKS" --panels "$CHECK_N" --pairs "$CHECK_N" --batch 48 --json "$OUT/checks.json" 2>&1 | quiet
ls -la "$OUT"
echo "call took $(( $(date +%s) - T0 )) s"
