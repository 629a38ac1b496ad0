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

import contextlib
import importlib
import importlib.util
import inspect
import math
import numbers
import signal
import sys
import threading
import time
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
            try:
                return ep.load()
            except BaseException as err:  # noqa: BLE001 - as for a plugin module
                if isinstance(err, KeyboardInterrupt):
                    raise
                raise RewardError(f"reward '{name}': loading entry point {ep.value} failed: {err!r}") from err
    raise RewardError(
        f"unknown reward '{name}' (registered: {', '.join(registered_rewards())}; "
        f"or give 'module:function', 'path/to/file.py:function', or an entry point in "
        f"'{ENTRY_POINT_GROUP}')"
    )


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RewardError(f"reward plugin '{name}': cannot import module '{module}': {err}") from err
    except BaseException as err:  # noqa: BLE001 - a plugin's import may raise anything, sys.exit included
        if isinstance(err, KeyboardInterrupt):
            raise
        raise RewardError(f"reward plugin '{name}': importing module '{module}' failed: {err!r}") from err


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
    except BaseException as err:  # noqa: BLE001 - a plugin file may raise anything, sys.exit included
        del sys.modules[mod_name]
        if isinstance(err, KeyboardInterrupt):
            raise
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
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            raise RewardError(
                f"reward '{name}' ({_describe(fn)}) has no inspectable signature; a reward is "
                "fn(prompts, completions, **fields)"
            ) from None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise RewardError(
                f"reward '{name}' ({_describe(fn)}) takes ({', '.join(p.name for p in params)}); "
                "a reward is fn(prompts, completions, **fields)"
            )
        # config kwargs must name a declared parameter: a typo must not vanish into **fields
        named = [
            p
            for p in list(inspect.signature(fn).parameters.values())[2:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in kwargs:
            if key not in {p.name for p in named}:
                raise RewardError(
                    f"reward '{name}' has no parameter '{key}' "
                    f"(parameters: {', '.join(p.name for p in named) or 'none'})"
                )
        return cls(name=name, fn=fn, kwargs=kwargs)

    def warm_up(self) -> None:
        """A reward may carry ``fn.warmup(**kwargs)``: what its first call would load or start (a process
        pool, a model), done before any call is timed."""
        warmup = getattr(self.fn, "warmup", None)
        if callable(warmup):
            warmup(**self.kwargs)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        fields: dict[str, list],
        timeout_s: Optional[float] = None,
    ) -> list[Optional[float]]:
        """Score a batch; errors name the reward, the plugin and, where a quick search finds it, the
        sample. ``timeout_s``: a call that runs longer raises ``RewardTimeout`` (in a main thread, where
        a signal can interrupt Python code; elsewhere the caller's deadline is the only bound)."""
        n = len(completions)
        call_fields = {**fields, **self.kwargs}
        self.check_fields(call_fields)
        start = time.monotonic()
        try:
            with _deadline(timeout_s, self.name, n):
                out = self.fn(list(prompts), list(completions), **call_fields)
        except RewardTimeout:
            raise
        except Exception as err:
            # Look for the failing sample only after a quick failure (a slow one, e.g. a judge backend that
            # timed out, is not called again), by halving: at most 2 log2(n) more calls.
            quick = time.monotonic() - start < 1.0
            idx = self._find_failing_sample(prompts, completions, call_fields) if quick else None
            where = f"sample {idx}" if idx is not None else f"a batch of {n} samples"
            raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) raised on {where}: {err!r}") from err
        return self._check_output(out, n)

    def check_fields(self, names) -> None:
        """Every parameter without a default must be among ``names`` (data columns, scorer fields, kwargs)."""
        params = inspect.signature(self.fn).parameters
        for pname, p in list(params.items())[2:]:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if p.default is p.empty and pname not in names:
                raise RewardError(
                    f"reward '{self.name}' needs the field '{pname}', which the data does not "
                    f"provide (fields: {', '.join(sorted(names))})"
                )

    def _fails(self, prompts, completions, call_fields, lo: int, hi: int) -> bool:
        n = len(completions)
        part = {k: (v[lo:hi] if isinstance(v, list) and len(v) == n else v) for k, v in call_fields.items()}
        if isinstance(part.get("rewards"), dict):
            part["rewards"] = {k: v[lo:hi] for k, v in part["rewards"].items()}
        try:
            with _deadline(5.0, self.name, hi - lo):
                self.fn(list(prompts[lo:hi]), list(completions[lo:hi]), **part)
        except Exception:
            return True
        return False

    def _find_failing_sample(self, prompts, completions, call_fields) -> Optional[int]:
        lo, hi = 0, len(completions)
        while hi - lo > 1:  # invariant: [lo, hi) fails as a batch
            mid = (lo + hi) // 2
            if self._fails(prompts, completions, call_fields, lo, mid):
                hi = mid
            elif self._fails(prompts, completions, call_fields, mid, hi):
                lo = mid
            else:
                return None  # fails only together (a batch-level fault)
        return lo if hi - lo == 1 and self._fails(prompts, completions, call_fields, lo, hi) else None

    def _check_output(self, out: Any, n: int) -> list[Optional[float]]:
        if not isinstance(out, (list, tuple)):
            raise RewardError(
                f"reward '{self.name}' ({_describe(self.fn)}) returned {type(out).__name__}, "
                f"expected a list of {n} numbers or None"
            )
        if len(out) != n:
            raise RewardError(f"reward '{self.name}' ({_describe(self.fn)}) returned {len(out)} values for {n} samples")
        clean: list[Optional[float]] = []
        for i, v in enumerate(out):
            if v is None:
                clean.append(None)
                continue
            try:
                x = float(v) if isinstance(v, numbers.Real) else None
            except OverflowError:  # an int too large for a float
                x = math.inf
            if x is None or math.isinf(x):  # numpy's inf too: one inf makes a whole group's advantages NaN
                raise RewardError(
                    f"reward '{self.name}' ({_describe(self.fn)}) returned {v!r} for sample {i}; "
                    f"expected a finite number or None"
                )
            clean.append(None if math.isnan(x) else x)
        return clean


class RewardTimeout(RewardError):
    """A reward call that ran past its time limit."""


@contextlib.contextmanager
def _deadline(seconds: Optional[float], name: str, n: int):
    """Raise ``RewardTimeout`` in the calling code after ``seconds`` (SIGALRM: main thread only; nested
    use keeps the outer limit's remaining time as it was)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"reward '{name}' did not return within {seconds:g} s on {n} samples (rewards.timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - started)))
