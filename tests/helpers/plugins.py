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
