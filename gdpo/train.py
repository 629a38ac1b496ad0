"""``python -m gdpo.train [--config FILE] [key=value ...]``: the entry point `ray job submit` runs."""

from __future__ import annotations

import sys

from gdpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
