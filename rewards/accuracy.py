"""``accuracy``: 1.0 when the completion's final answer equals the gold answer, else 0.0.

Equality is math-verify's (parse both sides, compare symbolically), run in a process pool with a
per-item timeout (see ``verifier_pool``). Accepted answer forms: ``\\boxed{..}``, GSM8K's ``#### N``,
plain numbers and LaTeX. A gold answer that cannot be parsed scores None (unscorable), as does an
item that times out; a completion without a parsable answer scores 0.0.
"""

from __future__ import annotations

import re
from typing import Optional

from rewards.registry import register_reward
from rewards.verifier_pool import shared_pool

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")
_COMMAND = re.compile(r"\\text\{[^}]*\}|\\[A-Za-z]+")


def _bare_math(text: str) -> bool:
    """A gold written as bare LaTeX or an expression (MATH-style), not prose: no math delimiters, and no
    word of two or more letters outside LaTeX commands (prose would parse as a product of symbols)."""
    if any(mark in text for mark in _DELIMITERS):
        return False
    return re.search(r"[A-Za-z]{2,}", _COMMAND.sub(" ", text)) is None


def normalize_answer_text(text: str) -> str:
    """Make GSM8K's ``#### N`` form look like a boxed answer; otherwise leave the text to math-verify."""
    if "\\boxed" not in text and "####" in text:
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        value = _THOUSANDS.sub("", lines[0].strip().rstrip(".")) if lines else ""
        if value:
            return f"\\boxed{{{value}}}"
    return text


def check_answer(gold: str, pred: str, timeout_s: float = 5.0) -> Optional[bool]:
    """math-verify equality of ``pred`` against ``gold``; None when the gold cannot be parsed.

    Runs inside a verifier worker process (its main thread), where math-verify's signal-based
    timeouts work. Each of math-verify's steps (gold parse, up to twice; prediction parse; verify)
    gets a fifth of ``timeout_s`` (at least 1 s), so a slow item ends inside math-verify (a slow
    prediction scores False, a slow gold None) before the pool would kill the process.
    """
    from math_verify import parse, verify

    seconds = max(1, int(timeout_s // 5))
    gold_text = normalize_answer_text(gold)
    gold_parsed = []
    if _bare_math(gold_text):  # "\\frac{\\sqrt{3}}{2}", "(3, -1)", "[2, 5)": LaTeX only parses inside delimiters
        gold_parsed = parse(f"${gold_text}$", parsing_timeout=seconds)
    if not gold_parsed:
        gold_parsed = parse(gold_text, parsing_timeout=seconds)
    if not gold_parsed:
        return None
    pred_parsed = parse(normalize_answer_text(pred), parsing_timeout=seconds)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


@register_reward("accuracy")
def accuracy(
    prompts: list[str], completions: list[str], answer: list[str], processes: int = 2, timeout_s: float = 20.0, **_
) -> list[Optional[float]]:
    """Verifiable-answer reward (the rule-based accuracy reward of DeepSeek-R1, Guo et al. 2025, §2.2.2)."""
    verdicts = _pool(processes, timeout_s).map([(str(g), c) for g, c in zip(answer, completions)])
    return [None if v is None else float(v) for v in verdicts]


def _pool(processes: int, timeout_s: float):
    return shared_pool(check_answer, processes, timeout_s, warmup=("\\frac{1}{2}", "\\boxed{0.5}"))


def _warm_up(processes: int = 2, timeout_s: float = 20.0, **_) -> None:
    """Start the verifier processes (math-verify imported) before the first step's time limit runs."""
    _pool(processes, timeout_s).start()


accuracy.warmup = _warm_up  # called by ``BoundReward.warm_up`` with the reward's kwargs
