#!/usr/bin/env bash
# Toy model training that outlives one device call (issue 10's "next"): the training runs in its own process
# session on the warm device machine while short calls watch it; no resume, no second data rendering.
#   bash bench/toy_train_bg.sh $OUT start     # call 1: init from the shipped transformer, start training for
#                                             #   TRAIN_MINUTES, watch it until WATCH seconds have passed
#   bash bench/toy_train_bg.sh $OUT watch     # call 2 (right after: the machine stays warm 30 s): watch again
#   bash bench/toy_train_bg.sh $OUT finish    # call 3: wait for the end, export, run the model's checks
# Each call returns train.log and state.json; `finish` returns the exported folder as weights.tar.* (cat | tar x)
# and the checks' JSON. Carry .whl (diffusers 0.42.1, importlib_metadata 10.2.0, lazy_importer 0.1.0).
set -u
OUT=${1:?output folder}
PART=${2:?start, watch or finish}
TRAIN_MINUTES=${TRAIN_MINUTES:-19}   # the training process's own budget (it saves and stops before it)
WATCH=${WATCH:-570}                  # seconds a watching call lasts
LR=${LR:-4e-4}
CHECK_ARGS=${CHECK_ARGS:-}
ARGS=${ARGS:-}                       # more training options (a CPU smoke test: ARGS="--n-images 200 --batch 8")
T0=$(date +%s)
source bench/gpu_env.sh    # the carried wheels on the device machine, else the installed packages
RUN=runs/toy-v3
quiet() { grep -v -e Warning -e Loading | cut -c1-300; }
running() { [ -f $RUN/train.pid ] && kill -0 "$(cat $RUN/train.pid)" 2>/dev/null; }
watch() {  # until the training process ends or $1 seconds since this call started
    while running && [ $(( $(date +%s) - T0 )) -lt "$1" ]; do sleep 15; done
    tail -n 4 $RUN/train.log
}
back() { cp $RUN/train.log $RUN/state.json "$OUT"/ 2>/dev/null; ls -la "$OUT"; }
case "$PART" in
    start)
        nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
        python3 -m characonsist.toy.train --out $RUN --stage init --vae-from src/characonsist/toy/weights/vae \
            --transformer-from src/characonsist/toy/weights/transformer 2>&1 | quiet
        setsid nohup python3 -m characonsist.toy.train --out $RUN --stage transformer --precision bf16 \
            --cache /tmp/toy-data --minutes "$TRAIN_MINUTES" --steps auto --lr "$LR" $ARGS > $RUN/train.out 2>&1 &
        echo $! > $RUN/train.pid
        watch "$WATCH"; back ;;
    watch)
        watch "$WATCH"; back ;;
    finish)
        watch $((WATCH - 200))
        if running; then echo "training still running; not exported"; back; exit 1; fi
        grep -v -e Warning $RUN/train.out | tail -n 5 | cut -c1-300
        python3 -m characonsist.toy.train --out $RUN --stage export --weights /tmp/weights 2>&1 | quiet
        left=$(( WATCH - ($(date +%s) - T0) - 10 ))
        timeout "$left" python3 -m characonsist.toy.checks --model-dir /tmp/weights --device "${DEVICE:-cuda}" --batch 48 $CHECK_ARGS \
            --json "$OUT/toy_checks.json" 2>&1 | quiet
        tar cf - -C /tmp/weights . | split -b 15m - "$OUT"/weights.tar.
        back ;;
    *) echo "unknown part $PART"; exit 2 ;;
esac
