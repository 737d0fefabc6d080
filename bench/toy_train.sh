#!/usr/bin/env bash
# Toy model v3 training on the lent GPU machine (issue 10): device calls of under 10 minutes each on one machine,
# data parallel over every GPU of the machine (torchrun), the run folder kept in runs/toy-v3 between the calls of a
# session (a warm machine keeps it), and returned after every call as tar parts (a returned file is at most 16 MiB).
#   bash bench/toy_train.sh $OUT scratch     # new run around the shipped VAE; schedule planned over two calls
#   bash bench/toy_train.sh $OUT continue    # new run starting from the shipped transformer (continues a model)
#   bash bench/toy_train.sh $OUT resume      # the next call: resumes the run and finishes its schedule
# Then, here: cat run.tar.* | tar xf - -C RUN && python -m characonsist.toy.train --out RUN --stage export
# ARGS adds options to every training command, e.g. ARGS="--two-character-every 2" mixes in two-character images
# (docs/TOY_WORLD.md, "Two characters in one image"; kept in the run's config once set).
# Carry .whl (diffusers 0.42.1, importlib_metadata 10.2.0, lazy_importer 0.1.0; BENCHMARKS.md).
# Each training command runs under `timeout`, so the run folder comes back even if training hangs.
set -u
OUT=${1:?output folder}
PART=${2:?scratch, continue or resume}
MINUTES=${MINUTES:-8.6}          # training command's own budget (it saves and stops before it)
EXTRA=${EXTRA:-7.6}              # minutes of training planned for the resume call
ARGS=${ARGS:-}                    # more options of characonsist.toy.train for the training commands
source bench/gpu_env.sh    # the carried wheels on the device machine, else the installed packages
RUN=runs/toy-v3
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TRAIN="timeout 545 python3 -m torch.distributed.run --standalone --nproc_per_node $NGPU -m characonsist.toy.train
       --out $RUN --stage transformer --precision bf16 --compile --cache /tmp/toy-data --minutes $MINUTES $ARGS"
quiet() { grep -v -e Warning -e Loading | cut -c1-300; }
case "$PART" in
    scratch|continue)
        FROM=""
        [ "$PART" = continue ] && FROM="--transformer-from src/characonsist/toy/weights/transformer"
        python3 -m characonsist.toy.train --out $RUN --stage init --vae-from src/characonsist/toy/weights/vae \
            $FROM 2>&1 | quiet
        $TRAIN --steps auto --extra-minutes "$EXTRA" --lr 5e-4 2>&1 | quiet ;;
    resume)
        $TRAIN --rewarm 200 2>&1 | quiet ;;
    *) echo "unknown part $PART"; exit 2 ;;
esac
cp $RUN/train.log $RUN/state.json "$OUT"/
tar cf - -C $RUN . | split -b 15m - "$OUT"/run.tar.
ls -la "$OUT"
