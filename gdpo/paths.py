"""Where gdpo keeps what it builds for a user (the tiny SFT policy), found from any working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["CACHE_ENV", "user_cache_dir", "resolve_cache_dir"]

CACHE_ENV = "GDPO_CACHE_DIR"


def user_cache_dir() -> Path:
    """``$GDPO_CACHE_DIR``, else the platform's per-user cache: ``$XDG_CACHE_HOME/gdpo`` (``~/.cache/gdpo``)
    on Linux, ``~/Library/Caches/gdpo`` on macOS, ``%LOCALAPPDATA%\\gdpo\\Cache`` on Windows."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "gdpo" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "gdpo"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gdpo"


def resolve_cache_dir(setting: Optional[str]) -> Path:
    """``sft.cache_dir`` when set (``~`` expanded; a relative path is the current directory's), else
    :func:`user_cache_dir`."""
    return Path(setting).expanduser() if setting else user_cache_dir()
