"""Is the shipped toy model an instrument? The four checks of docs/TOY_WORLD.md ("The checks").

The same command as ``python -m characonsist.toy.checks`` (its options; ``--help``):

    python bench/toy_model_check.py --device cuda --json out/toy_checks.json
    python bench/toy_model_check.py --only adherence,diversity --n 100 --seeds 32      # a CPU look
"""

from characonsist.toy.checks import main

if __name__ == "__main__":
    raise SystemExit(main())
