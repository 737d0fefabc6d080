#!/usr/bin/env bash
# Toy model v3 training on the lent GPU machine (issue 10): two device calls on one machine, each under 10 minutes,
# data parallel over every GPU of the machine (torchrun), the run folder kept in runs/toy-v3 between the calls.
#   call 1: bash bench/toy_train.sh $OUT first    # pipeline around the shipped VAE; schedule planned over both calls
#   call 2: bash bench/toy_train.sh $OUT second   # resumes and finishes the schedule
# Each call returns the log, the state and the whole run folder as tar parts (files from a call are at most 16 MiB):
#   cat run.tar.* | tar xf - -C RUN && python -m characonsist.toy.train --out RUN --stage export
# Carry .whl (diffusers 0.42.1, importlib_metadata 10.2.0, lazy_importer 0.1.0; BENCHMARKS.md).
set -u
OUT=${1:?output folder}
PART=${2:?first or second}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
RUN=runs/toy-v3
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TRAIN="python3 -m torch.distributed.run --standalone --nproc_per_node $NGPU -m characonsist.toy.train --out $RUN
       --stage transformer --precision bf16 --compile --cache /tmp/toy-data"
if [ "$PART" = first ]; then
    python3 -m characonsist.toy.train --out $RUN --stage init --vae-from src/characonsist/toy/weights/vae 2>&1 \
        | grep -v -e Warning -e "Loading"
    $TRAIN --steps auto --extra-minutes 7.3 --minutes 9.0 --lr 5e-4 2>&1 | grep -v -e Warning -e "Loading"
else
    $TRAIN --rewarm 300 --minutes 9.0 2>&1 | grep -v -e Warning -e "Loading"
fi
cp $RUN/train.log $RUN/state.json "$OUT"/
tar cf - -C $RUN . | split -b 15m - "$OUT"/run.tar.
ls -la "$OUT"
