"""``python -m characonsist``: the command line (also what ``accelerate launch -m characonsist ...`` starts)."""

from .app.parallel import exit_process
from .cli import main

if __name__ == "__main__":
    exit_process(main())
