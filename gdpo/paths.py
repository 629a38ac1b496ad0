"""Where gdpo finds its presets (configs/) and keeps what it builds for a user (the tiny SFT policy),
found from any working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from gdpo.structured import ConfigError

__all__ = ["CACHE_ENV", "PRESETS", "preset_path", "user_cache_dir", "resolve_cache_dir"]

CACHE_ENV = "GDPO_CACHE_DIR"

# The presets: configs/ at the top of a source checkout; an installed wheel carries them as gdpo/configs/
# (setup.py copies them there at build time).
_HERE = Path(__file__).resolve().parent
PRESETS = next(
    (p for p in (_HERE / "configs", _HERE.parent / "configs") if (p / "tiny_cpu.yaml").is_file()),
    _HERE.parent / "configs",
)


def preset_path(spec: str | Path) -> Path:
    """A config file: ``spec`` itself where that file exists, else the preset of that name shipped in the
    package (``multireward_cpu``, ``multireward_cpu.yaml`` or ``configs/multireward_cpu.yaml``, so the
    paths of a source checkout work from any directory and from an installed wheel)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if (PRESETS / name).is_file() and path.parent in (Path("."), Path("configs")):
        return PRESETS / name
    presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {spec} (nor a preset of that name; presets: {presets})")


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
