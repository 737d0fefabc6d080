"""``python -m characonsist``: the command line (also what ``accelerate launch -m characonsist ...`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
