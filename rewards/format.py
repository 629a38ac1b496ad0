"""``format``: 1.0 when the completion ends in exactly one final answer, else 0.0."""

from __future__ import annotations

import re
from typing import Optional

from rewards.registry import RewardError, register_reward

_BOXED_LAST = re.compile(r"\\boxed\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}\s*$")


@register_reward("format")
def format_reward(prompts, completions, pattern: Optional[str] = None, **_) -> list[float]:
    """Format reward (DeepSeek-R1, Guo et al. 2025, §2.2.2, adapted to a boxed answer).

    Default: exactly one ``\\boxed{...}`` and nothing but whitespace after it. With ``pattern``, a
    regular expression that must match the whole completion (re.DOTALL).
    """
    if pattern is not None:
        try:
            rx = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise RewardError(f"reward 'format': kwarg pattern {pattern!r} is not a valid regex: {err}") from err
        return [1.0 if rx.fullmatch(c) else 0.0 for c in completions]
    return [1.0 if c.count("\\boxed{") == 1 and _BOXED_LAST.search(c) else 0.0 for c in completions]
