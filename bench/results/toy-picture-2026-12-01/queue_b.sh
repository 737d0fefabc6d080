#!/usr/bin/env bash
# the final tables: CharaConsist (default renoise; euler beside it) and the peers on the full suite with a rendered
# picture; then the peers on the first 18 stories with the unseen pictures
set -u
cd /work/wt/issue-15
R=bench/results/toy-picture-2026-12-01
export OMP_NUM_THREADS=1
B=".venv/bin/characonsist bench toy --threads 1"
$B --identity-picture render --methods characonsist,characonsist+inversion=euler \
    --json $R/full_render_characonsist.json > $R/full_render_characonsist.log 2>&1
$B --identity-picture render --methods consistory,storysync,storydiffusion \
    --json $R/full_render_peers.json > $R/full_render_peers.log 2>&1
for kind in offgrid degraded; do
  $B --identity-picture $kind --limit 18 --methods consistory,storysync,storydiffusion \
      --json $R/limit18_${kind}_peers.json > $R/limit18_${kind}_peers.log 2>&1
done
