"""Reward registry and the scoring wrapper that checks what plugins return.

A reward is ``fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]``.
Every dataset column arrives as a list keyword (the gold answer is ``answer``); the scorer adds
``completion_token_counts`` (tokens of each completion), ``group_ids`` (which prompt each sample
belongs to) and ``rewards`` (a dict of the reward columns computed before this one, in config
order). ``None`` means "could not score"; it becomes NaN in the reward matrix.

Plugins are found, in order, as: a name registered with ``@register_reward``; ``module:function``;
``path/to/file.py:function``; an entry point in the group ``gdpo.rewards``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

RewardFn = Callable[..., list]
ENTRY_POINT_GROUP = "gdpo.rewards"
_REGISTRY: dict[str, RewardFn] = {}
_BUILTINS_LOADED = False


class RewardError(RuntimeError):
    """A reward that cannot be found, or that failed or misbehaved while scoring."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name``; registering a name twice is an error."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RewardError(f"reward name '{name}' is already registered (by {_describe(_REGISTRY[name])})")
        _REGISTRY[name] = fn
        return fn
    return deco


def registered_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for mod in ("rewards.accuracy", "rewards.length", "rewards.format", "rewards.chain_arith"):
            importlib.import_module(mod)


def _describe(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def resolve_reward(name: str) -> RewardFn:
    """Find the reward function for a config name (see module docstring for the forms)."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        target, _, attr = name.rpartition(":")
        module = _load_file(target, name) if target.endswith(".py") else _import(target, name)
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise RewardError(f"reward plugin '{name}': {target} has no function '{attr}'")
        return fn
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise RewardError(f"unknown reward '{name}' (registered: {', '.join(registered_rewards())}; "
                      f"or give 'module:function', 'path/to/file.py:function', or an entry point in "
                      f"'{ENTRY_POINT_GROUP}')")


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RewardError(f"reward plugin '{name}': cannot import module '{module}': {err}") from err


def _load_file(path: str, name: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise RewardError(f"reward plugin '{name}': file not found: {file}")
    mod_name = f"gdpo_reward_plugin_{abs(hash(str(file)))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise RewardError(f"reward plugin '{name}': loading {file} failed: {err!r}") from err
    return module


@dataclass(frozen=True)
class BoundReward:
    """A resolved reward with its config kwargs bound; call ``score``."""

    name: str
    fn: RewardFn
    kwargs: dict

    @classmethod
    def from_name(cls, name: str, kwargs: Optional[dict] = None) -> "BoundReward":
        fn = resolve_reward(name)
        kwargs = dict(kwargs or {})
        # config kwargs must name a declared parameter: a typo must not vanish into **fields
        named = [p for p in list(inspect.signature(fn).parameters.values())[2:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in {p.name for p in named}:
                raise RewardError(f"reward '{name}' has no parameter '{key}' "
                                  f"(parameters: {', '.join(p.name for p in named) or 'none'})")
        return cls(name=name, fn=fn, kwargs=kwargs)

    def score(self, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, list]) -> list[Optional[float]]:
        """Score a batch; errors name the reward, the plugin and the sample index."""
        n = len(completions)
        call_fields = {**fields, **self.kwargs}
        self._check_fields(call_fields)
        try:
            out = self.fn(list(prompts), list(completions), **call_fields)
        except Exception as err:
            idx = self._find_failing_sample(prompts, completions, call_fields)
            where = f"sample {idx}" if idx is not None else f"a batch of {n} samples"
            raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) raised on {where}: {err!r}") from err
        return self._check_output(out, n)

    def _check_fields(self, call_fields: dict) -> None:
        params = inspect.signature(self.fn).parameters
        for pname, p in list(params.items())[2:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if p.default is p.empty and pname not in call_fields:
                raise RewardError(f"reward '{self.name}' needs the field '{pname}', which the data does not "
                                  f"provide (fields: {', '.join(sorted(call_fields))})")

    def _find_failing_sample(self, prompts, completions, call_fields) -> Optional[int]:
        n = len(completions)
        for i in range(n):
            one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in call_fields.items()}
            if "rewards" in one and isinstance(one["rewards"], dict):
                one["rewards"] = {k: v[i:i + 1] for k, v in one["rewards"].items()}
            try:
                self.fn(list(prompts[i:i + 1]), list(completions[i:i + 1]), **one)
            except Exception:
                return i
        return None

    def _check_output(self, out: Any, n: int) -> list[Optional[float]]:
        if not isinstance(out, (list, tuple)):
            raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) returned {type(out).__name__}, "
                              f"expected a list of {n} numbers or None")
        if len(out) != n:
            raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) returned {len(out)} values for {n} samples")
        clean: list[Optional[float]] = []
        for i, v in enumerate(out):
            if v is None:
                clean.append(None)
            elif isinstance(v, numbers.Real) and not (isinstance(v, float) and math.isinf(v)):
                clean.append(None if math.isnan(float(v)) else float(v))
            else:
                raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) returned {v!r} for sample {i}; "
                                  f"expected a finite number or None")
        return clean

