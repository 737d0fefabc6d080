#!/usr/bin/env bash
# after the default became euler: the pictures the model was not trained on, vanilla and CharaConsist, full suite
set -u
cd /work/wt/issue-15
R=bench/results/toy-picture-2026-12-01
export OMP_NUM_THREADS=1
for kind in offgrid degraded; do
  .venv/bin/characonsist bench toy --threads 1 --identity-picture $kind --methods vanilla,characonsist \
      --json $R/full_${kind}.json > $R/full_${kind}.log 2>&1
done
