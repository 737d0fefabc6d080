#!/usr/bin/env bash
# The memory-mode table on the GPU machine: `gpu_bench.py --phases table` over the entries in ENTRIES,
# one process per entry, on every visible GPU side by side; the budget guard skips what would not end in BUDGET s.
# Carry .whl (bench/table_wheels.sh: diffusers, torchao, bitsandbytes slimmed to CUDA 13.0). $OUT gets
# bench_TAG.json (every record) and log_TAG.txt (every process's output and the table).
#   ENTRIES=none/none,int8/none BUDGET=500 bash bench/table_gpu.sh $OUT A
set -u
OUT=${1:?output folder}
TAG=${2:-table}
ENTRIES=${ENTRIES:?QUANTIZE/MEMORY[+compile][@N] entries, comma-separated}
BUDGET=${BUDGET:-500}
source bench/gpu_env.sh    # the carried wheels on the device machine, else the installed packages
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
df -h /dev/shm /tmp | tail -2
GPUS=$(python3 -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")
timeout $((BUDGET + 60)) python3 bench/gpu_bench.py --phases table:4 --table-modes "$ENTRIES" --table-gpus "$GPUS" \
    --budget-s "$BUDGET" --out "$OUT" --tag "$TAG" 2>&1 | grep -v -e "Failed to load" -e register_constant
