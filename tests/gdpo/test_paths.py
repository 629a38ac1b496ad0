"""The per-user cache: the built tiny policy is found from any working directory."""

import sys

import pytest

from gdpo.config import load_config
from gdpo.paths import CACHE_ENV, resolve_cache_dir, user_cache_dir
from gdpo.tasks.tiny_policy import policy_dir


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the Linux convention")
def test_the_default_follows_xdg_and_the_environment_variable_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "gdpo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "gdpo"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    assert resolve_cache_dir(str(tmp_path / "set")) == tmp_path / "set"  # sft.cache_dir wins over both
    assert resolve_cache_dir(None) == tmp_path / "mine"


def test_the_policy_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    sft = load_config(None, []).sft
    assert sft.cache_dir is None  # the default config names no directory
    here = policy_dir(sft)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert policy_dir(sft) == here and here.is_absolute() and here.parent == tmp_path / "cache"
    moved = load_config(None, [f"sft.cache_dir={tmp_path / 'other'}"]).sft
    assert policy_dir(moved).parent == tmp_path / "other" and policy_dir(moved).name == here.name
