#!/usr/bin/env bash
# after the default became euler: the peers with a rendered picture on the full suite, then on the first 18 stories
# with the pictures the model was not trained on
set -u
cd /work/wt/issue-15
R=bench/results/toy-picture-2026-12-01
export OMP_NUM_THREADS=1
B=".venv/bin/characonsist bench toy --threads 1"
$B --identity-picture render --methods consistory,storysync,storydiffusion \
    --json $R/full_render_peers.json > $R/full_render_peers.log 2>&1
for kind in offgrid degraded; do
  $B --identity-picture $kind --limit 18 --methods consistory,storysync,storydiffusion \
      --json $R/limit18_${kind}_peers.json > $R/limit18_${kind}_peers.log 2>&1
done
