#!/usr/bin/env bash
# The toy world's GPU evaluation (issue 5): the shipped model's adherence and diversity, then the full suite
# (60 stories) for every method and ablation, one JSON per group of methods (a killed group loses only itself).
# Device call (carry .whl_toy: the diffusers wheels; see BENCHMARKS.md):
#   bash bench/toy_gpu_eval.sh $OUT
set -u
OUT=${1:?output folder}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_toy/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 bench/toy_model_check.py --n 200 --seeds 64 --device cuda --skip time \
    --json "$OUT/toy_model_check.json" 2>&1 | grep -v Warning
bench() {  # tag methods seconds
    timeout "$3" python3 -m characonsist.cli bench toy --methods "$2" --device cuda --quiet \
        --json "$OUT/toy_bench_$1.json" 2>&1 | grep -v Warning
}
bench main vanilla,characonsist,oracle 200
bench ablations characonsist-no-tracking,characonsist-no-merge,characonsist-no-mask,characonsist+sim_threshold=0.3 240
bench peers consistory,storysync,storydiffusion 300
