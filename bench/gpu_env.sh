# Sourced by the GPU scripts of bench/: where the packages come from.
# - On the lent device machine (torch but no diffusers): the wheels carried in .whl/ go to /tmp/site.
# - On your own GPU machine, with characonsist installed (`pip install -e '.[test]'` or the bootstrap): no .whl/
#   folder is needed; the installed packages and this checkout's src/ are used.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "bench: installing the wheels of .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src
else
    python3 -c "import diffusers, torch" 2>/dev/null \
        || { echo "bench: no .whl/ folder and python3 cannot import diffusers and torch: install the package" \
                  "(pip install -e '.[test]') or carry the wheels (BENCHMARKS.md)" >&2; exit 1; }
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
