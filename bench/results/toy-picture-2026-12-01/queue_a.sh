#!/usr/bin/env bash
# runs after choose_a: vanilla with the picture (every pinned mode gives vanilla the same frames), then the
# reference without a picture (vanilla, characonsist: consistency against the generated identity)
set -u
cd /work/wt/issue-15
R=bench/results/toy-picture-2026-12-01
export OMP_NUM_THREADS=1
while kill -0 30395 2>/dev/null; do sleep 30; done
.venv/bin/characonsist bench toy --threads 1 --identity-picture render --methods vanilla \
    --json $R/full_render_vanilla.json > $R/full_render_vanilla.log 2>&1
.venv/bin/characonsist bench toy --threads 1 --methods vanilla,characonsist \
    --json $R/full_generated_reference.json > $R/full_generated_reference.log 2>&1
