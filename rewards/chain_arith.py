"""Rewards of the chain-arithmetic task (``gdpo/tasks/chain_arith.py``) that differ in scale and sparsity,
for a multi-reward setting like the GDPO paper's tool-calling and coding experiments (a wide-range
correctness reward beside small binary ones), where GRPO's summed reward lets the widest one dominate:

- ``chain_credit`` in [-3, 3]: partial credit in the form of ToolRL's and the GDPO paper's tool-calling
  correctness reward, 6·(matched / total) − 3, where matched counts the shortest solution's lines (each
  step, then the boxed answer) found in the completion in order. Dense.
- ``no_restate`` in {0, 1}: 1 when no line of the completion restates the problem's expression. Easy.
- ``tight_budget`` in {0, 1}: 1 when the completion is at most ``slack`` tokens longer than the
  problem's floor (the ``floor_tokens`` column: its shortest solution in the policy's tokens). Sparse;
  condition it on accuracy (GDPO Eq. 8).

They read the task's columns (``shortest_solution``, ``question``, ``floor_tokens``); other data lacks
them, and scoring names the missing field.
"""

from __future__ import annotations

from rewards.registry import register_reward


def _matched_in_order(completion: str, needed: list[str]) -> int:
    lines = iter(line.strip() for line in completion.splitlines())
    matched = 0
    for need in needed:
        if any(line == need for line in lines):
            matched += 1
        else:
            break
    return matched


@register_reward("chain_credit")
def chain_credit(prompts, completions, shortest_solution: list[str], **_) -> list[float]:
    """6·(lines of the shortest solution found in order) / (its lines) − 3, in [-3, 3]."""
    out = []
    for text, shortest in zip(completions, shortest_solution):
        needed = [x.strip() for x in shortest.splitlines()]
        out.append(6.0 * _matched_in_order(text, needed) / len(needed) - 3.0)
    return out


@register_reward("no_restate")
def no_restate(prompts, completions, question: list[str], **_) -> list[float]:
    """1 unless a line of the completion contains the problem's expression (``Compute 3+4-2`` -> ``3+4-2``)."""
    out = []
    for text, q in zip(completions, question):
        expression = q.removeprefix("Compute ").strip()
        out.append(0.0 if any(expression in line for line in text.splitlines()) else 1.0)
    return out


@register_reward("tight_budget")
def tight_budget(
    prompts, completions, completion_token_counts: list[int], floor_tokens: list[int], slack: int = 10, **_
) -> list[float]:
    """1 when the completion has at most ``floor_tokens + slack`` tokens."""
    return [1.0 if n <= f + slack else 0.0 for n, f in zip(completion_token_counts, floor_tokens)]
