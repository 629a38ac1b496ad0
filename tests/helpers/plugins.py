"""Reward plugins used by the tests (importable by spawned processes as tests.helpers.plugins)."""

import time


def half(prompts, completions, **fields):
    return [0.5 for _ in completions]


def raises_on_bad(prompts, completions, **fields):
    return [1 / 0 if c == "bad" else 1.0 for c in completions]


def wrong_length(prompts, completions, **fields):
    return [1.0]


def not_a_number(prompts, completions, **fields):
    return ["high" for _ in completions]


def needs_difficulty(prompts, completions, difficulty, **fields):
    return [float(d) for d in difficulty]


def slow_check(gold, pred, timeout_s):
    """A verifier check that hangs on the prediction 'hang' (no signal can stop it)."""
    if pred == "hang":
        while True:
            time.sleep(0.1)
    return gold == pred


def hangs(prompts, completions, **fields):
    """A plugin stuck in Python code (a judge backend that never answers)."""
    while True:
        time.sleep(0.05)


def numpy_inf(prompts, completions, **fields):
    import numpy as np

    return [np.float32(np.inf) if c == "x" else np.float32(1.0) for c in completions]


def huge_int(prompts, completions, **fields):
    return [10**400 for _ in completions]


CALLS = []


def slow_then_raises(prompts, completions, **fields):
    """Fails after 1.5 s (a backend timeout); every call is recorded."""
    CALLS.append(len(completions))
    time.sleep(1.5)
    raise TimeoutError("judge backend timed out")


def counts_calls_and_raises_on_bad(prompts, completions, **fields):
    CALLS.append(len(completions))
    return [1 / 0 if c == "bad" else 1.0 for c in completions]


def die_always(prompts, completions, **fields):
    import os

    os._exit(1)
