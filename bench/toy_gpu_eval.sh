#!/usr/bin/env bash
# The toy world's GPU evaluation: the model's checks, then the full suite (60 stories) and the held-out
# suite for every method and ablation, one JSON per group of methods (a killed group loses only itself).
# Device call (carry .whl: the diffusers wheels; see BENCHMARKS.md):
#   bash bench/toy_gpu_eval.sh $OUT            # checks, full suite (all methods), held-out suite (main methods)
#   PARTS=checks bash bench/toy_gpu_eval.sh $OUT
set -u
OUT=${1:?output folder}
PARTS=${PARTS:-checks,full,heldout}
source bench/gpu_env.sh    # the carried wheels on the device machine, else the installed packages
nvidia-smi --query-gpu=name --format=csv,noheader
quiet() { grep -v -e Warning -e Loading; }
case ",$PARTS," in *,checks,*)
    timeout 150 python3 -m characonsist.toy.checks --device cuda --batch 48 --json "$OUT/toy_checks.json" 2>&1 | quiet
esac
bench() {  # tag seconds bench-options...
    local tag=$1 seconds=$2; shift 2
    timeout "$seconds" python3 -m characonsist.cli bench toy --device cuda --quiet --json "$OUT/toy_bench_$tag.json" \
        "$@" 2>&1 | quiet
}
case ",$PARTS," in *,full,*)
    bench main 200 --methods vanilla,characonsist,oracle
    bench ablations 240 --methods characonsist-no-tracking,characonsist-no-merge,characonsist-no-mask
    bench peers 330 --methods consistory,storysync,storydiffusion,vanilla+seeding=per_image
esac
case ",$PARTS," in *,heldout,*)
    bench heldout 300 --heldout --methods vanilla,characonsist,consistory,storysync,storydiffusion
esac
