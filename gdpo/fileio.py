"""Atomic file writes: write beside the target, then rename, so a killed process never leaves half a file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which then replaces ``path`` in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
