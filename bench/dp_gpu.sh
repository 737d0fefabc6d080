#!/usr/bin/env bash
# Two GPUs against one on the two-GPU machine (nvidia-h200-x2): two GPUs against one, through the data-parallel path.
#   toy:  the toy model's full suite (60 stories; METHODS, default vanilla,characonsist,consistory), one process on
#         GPU 0, then `bench toy --gpus 2`; the merged JSON compared with the one-process JSON apart from timings,
#         the image strips byte for byte; throughput ratio from the runs' run_seconds (loading excluded)
#   flux: full-size FLUX.1-dev architecture, random bf16 weights, identity + 4 frames x 8 stories, 1024x1024, STEPS
#         steps (default 20), one process on GPU 0, then two processes (accelerate launch); throughput ratio, peak
#         GPU memory per process (bench/dp_bench.py, bench/dp_compare.py speed)
# On your own GPU machine with the package installed: bash bench/dp_gpu.sh toy $OUT (no wheels needed).
# Device call, one per phase (carry .whl: diffusers 0.42.1 and its missing pure-Python wheels, as BENCHMARKS.md
# says; accelerate is on the machine):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 && bash bench/dp_gpu.sh toy $OUT
# Results: $OUT/<phase>_*.json, logs and the comparison's text; images stay in /tmp (too big to bring back).
# On a CPU (DEVICE=cpu PYTHON=.venv/bin/python): the same steps, small (4 toy stories at 2 steps, the tiny random
# FLUX), two processes started with accelerate launch instead of --gpus: this is how the script itself is tested.
set -u
PHASE=${1:?toy or flux}
OUT=${2:?output folder}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
METHODS=${METHODS:-vanilla,characonsist,consistory}
STEPS=${STEPS:-20}
LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
if [ "$DEVICE" = cpu ]; then
    TOY=(--device cpu --reduced --limit 4 --steps 2 --threads 1)
    TOY_TWO=("${LAUNCH[@]}" -m characonsist bench toy)
    FLUX=(--size tiny --stories 4 --frames 1 --height 64 --max-sequence-length 128)
    export OMP_NUM_THREADS=1
else
    TOY=(--device cuda --threads 4)      # the same torch threads in both runs: the JSON records them
    TOY_TWO=("$PY" -m characonsist bench toy --gpus 2)
    FLUX=()
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/${PHASE}_gpus.txt"
fi
mkdir -p "$OUT"
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}   # one host: results travel over the loopback
export BENCH_ENGINE_COMMIT=${BENCH_ENGINE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
case "$PHASE" in
toy)
    rm -rf /tmp/toy_one /tmp/toy_two
    CUDA_VISIBLE_DEVICES=0 timeout 300 "$PY" -m characonsist bench toy --methods "$METHODS" "${TOY[@]}" --quiet \
        --json "$OUT/toy_one.json" --images /tmp/toy_one 2>&1 | grep -v Warning | tee "$OUT/toy_one.log"
    timeout 240 "${TOY_TWO[@]}" --methods "$METHODS" "${TOY[@]}" --quiet \
        --json "$OUT/toy_two.json" --images /tmp/toy_two 2>&1 | grep -v Warning | tee "$OUT/toy_two.log"
    "$PY" bench/dp_compare.py toy "$OUT/toy_one.json" "$OUT/toy_two.json" --images /tmp/toy_one /tmp/toy_two \
        2>&1 | tee "$OUT/toy_compare.txt"
    ;;
flux)
    CUDA_VISIBLE_DEVICES=0 timeout 330 "$PY" bench/dp_bench.py "${FLUX[@]}" --steps "$STEPS" --out "$OUT" --tag one \
        2>&1 | grep -v Warning | tee "$OUT/flux_one.log"
    timeout 240 "${LAUNCH[@]}" bench/dp_bench.py "${FLUX[@]}" --steps "$STEPS" --out "$OUT" --tag two \
        2>&1 | grep -v Warning | tee "$OUT/flux_two.log"
    "$PY" bench/dp_compare.py speed "$OUT/dp_one.json" "$OUT/dp_two.json" 2>&1 | tee "$OUT/flux_compare.txt"
    ;;
*)
    echo "phase: toy or flux" >&2
    exit 2
    ;;
esac
