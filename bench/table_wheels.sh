#!/usr/bin/env bash
# The wheels the memory-mode table needs on the GPU machine (python 3.12, torch 2.11+cu130, no diffusers), into
# .whl/ (git-ignored; carry it: `carry: [".whl"]`). Run here, on a machine that reaches PyPI. bitsandbytes is
# slimmed to its CUDA 13.0 and CPU libraries (43 MB -> 3.6 MB, bench/slim_wheel.py) so that everything travels
# within the 64 MiB a device call takes (working tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
for wheel in diffusers==0.42.1 importlib_metadata==10.2.0 lazy_importer==0.1.0 torchao==0.18.0 bitsandbytes==0.50.2; do
    python3 -m pip download -q $P -d .whl "$wheel"
done
python3 bench/slim_wheel.py .whl/bitsandbytes-0.50.2-*.whl
du -ch .whl/*.whl | tail -1
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "working tree (tracked): %.1f MB\n", $1 / 1e6}'
