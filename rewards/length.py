"""Length rewards, measured in policy tokens (``completion_token_counts``).

``length_budget`` and ``dapo_overlong`` look only at lengths; the others are defined by their papers jointly with correctness, which they read from an earlier reward
column (``correctness_from``, default ``accuracy``; correct means value >= ``correct_threshold``).
A sample whose correctness is None scores None.

Notes: ``kimi_length`` gives 0 to a group whose lengths are all equal, as the paper specifies;
``efficient_sigmoid`` adds 1e-6 to the std of correct lengths (the formula is 0/0 there). The rewards
that read correctness define what a wrong answer earns, so the config refuses ``condition_on`` for
them: conditioned (wrong answers set to 0) and then normalized per group under GDPO, ``kimi_length``
ranked a lone correct-but-longest answer at advantage 0 and a long correct one below the wrong ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

from rewards.registry import RewardError, register_reward


def _correctness(rewards: Optional[dict], name: str, threshold: float, n: int, who: str) -> list[Optional[bool]]:
    if not rewards or name not in rewards:
        have = ", ".join(sorted(rewards or {})) or "none"
        raise RewardError(
            f"reward '{who}' needs the correctness reward '{name}' listed before it "
            f"(rewards computed so far: {have}); set its kwarg correctness_from"
        )
    col = rewards[name]
    if len(col) != n:
        raise RewardError(f"reward '{who}': correctness column '{name}' has {len(col)} values for {n} samples")
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v >= threshold for v in col]


def _groups(group_ids: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        out[g].append(i)
    return out


@register_reward("length_budget")
def length_budget(prompts, completions, completion_token_counts: list[int], max_tokens: int = 64, **_) -> list[float]:
    """1 if the completion has at most ``max_tokens`` tokens, else 0 (the GDPO paper's length reward, §4.2)."""
    return [1.0 if n <= max_tokens else 0.0 for n in completion_token_counts]


@register_reward("dapo_overlong")
def dapo_overlong(
    prompts, completions, completion_token_counts: list[int], max_tokens: int = 128, cache_tokens: int = 32, **_
) -> list[float]:
    """Soft overlong punishment (DAPO, Yu et al. 2025, Eq. 13), with L_max = max_tokens, L_cache = cache_tokens:
    0 if |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache if below L_max; -1 beyond."""
    start = max_tokens - cache_tokens
    out = []
    for n in completion_token_counts:
        if n <= start:
            out.append(0.0)
        elif n <= max_tokens:
            out.append((start - n) / cache_tokens)
        else:
            out.append(-1.0)
    return out


@register_reward("kimi_length")
def kimi_length(
    prompts,
    completions,
    completion_token_counts: list[int],
    group_ids: list[int],
    rewards: Optional[dict] = None,
    correctness_from: str = "accuracy",
    correct_threshold: float = 1.0,
    **_,
) -> list[Optional[float]]:
    """Kimi k1.5 length penalty (Kimi Team 2025, §2.3.3): per group, λ = 0.5 - (len - min)/(max - min);
    correct answers get λ, incorrect ones min(0, λ)."""
    n = len(completions)
    correct = _correctness(rewards, correctness_from, correct_threshold, n, "kimi_length")
    out: list[Optional[float]] = [None] * n
    for idx in _groups(group_ids).values():
        lens = [completion_token_counts[i] for i in idx]
        lo, hi = min(lens), max(lens)
        for i in idx:
            lam = 0.0 if hi == lo else 0.5 - (completion_token_counts[i] - lo) / (hi - lo)
            if correct[i] is not None:
                out[i] = lam if correct[i] else min(0.0, lam)
    return out


@register_reward("cosine_length")
def cosine_length(
    prompts,
    completions,
    completion_token_counts: list[int],
    rewards: Optional[dict] = None,
    max_tokens: int = 128,
    min_value_correct: float = 1.0,
    max_value_correct: float = 2.0,
    min_value_wrong: float = -10.0,
    max_value_wrong: float = 0.0,
    exceed_value: float = -10.0,
    correctness_from: str = "accuracy",
    correct_threshold: float = 1.0,
    **_,
) -> list[Optional[float]]:
    """Cosine length scaling (Yeo et al. 2025, "Demystifying Long CoT Reasoning in LLMs", Eq. 1):
    CosFn(t, T, η_min, η_max) = η_min + ½(η_max − η_min)(1 + cos(tπ/T)) with T = ``max_tokens``.
    Correct answers earn from r0_c = +2 (t = 0) down to rL_c = +1 (t = T); wrong ones from r0_w = −10
    (the shortest are punished hardest) up to rL_w = 0; a completion that reaches T (it was cut off
    there) gets r_exceed = −10. Those are the paper's values; open-r1's ``get_cosine_scaled_reward``
    defaults (1, 0.5, −1, −0.5, −1) are a rescaled variant. Set ``max_tokens`` to
    ``rollout.max_new_tokens`` so that a truncated completion is the one that reaches it."""
    n = len(completions)
    correct = _correctness(rewards, correctness_from, correct_threshold, n, "cosine_length")
    out: list[Optional[float]] = []
    for t, ok in zip(completion_token_counts, correct):
        if ok is None:
            out.append(None)
            continue
        if t >= max_tokens:
            out.append(exceed_value)
            continue
        at_zero, at_limit = (max_value_correct, min_value_correct) if ok else (min_value_wrong, max_value_wrong)
        out.append(at_limit + 0.5 * (at_zero - at_limit) * (1.0 + math.cos(t * math.pi / max_tokens)))
    return out


def _targets(target_tokens, n: int, who: str) -> list[float]:
    if isinstance(target_tokens, (int, float)):
        return [float(target_tokens)] * n
    if isinstance(target_tokens, list) and len(target_tokens) == n:
        return [float(t) for t in target_tokens]
    raise RewardError(
        f"reward '{who}': target_tokens must be a number (kwarg) or a per-sample column, got {target_tokens!r}"
    )


@register_reward("l1_exact")
def l1_exact(
    prompts,
    completions,
    completion_token_counts: list[int],
    target_tokens,
    rewards: Optional[dict] = None,
    alpha: float = 0.0003,
    correctness_from: str = "accuracy",
    correct_threshold: float = 1.0,
    **_,
) -> list[Optional[float]]:
    """L1-Exact (LCPO, Aggarwal & Welleck 2025, Eq. 1): r = 1{correct} − α·|n_gold − n_y|.

    ``target_tokens`` is the data's per-sample column: L1 writes the target into the prompt ("Think for
    N tokens"), so the template must carry ``{target_tokens}`` (the config check refuses it otherwise).
    α = 3e-4 is L1's value for 512-4k-token targets; at this project's 20-128-token lengths the length
    term is then at most 0.04: use α ≈ 1 / rollout.max_new_tokens."""
    n = len(completions)
    correct = _correctness(rewards, correctness_from, correct_threshold, n, "l1_exact")
    targets = _targets(target_tokens, n, "l1_exact")
    return [
        None if ok is None else float(ok) - alpha * abs(tg - t)
        for t, tg, ok in zip(completion_token_counts, targets, correct)
    ]


@register_reward("l1_max")
def l1_max(
    prompts,
    completions,
    completion_token_counts: list[int],
    target_tokens,
    rewards: Optional[dict] = None,
    alpha: float = 0.0003,
    delta: float = 0.5,
    correctness_from: str = "accuracy",
    correct_threshold: float = 1.0,
    **_,
) -> list[Optional[float]]:
    """L1-Max (LCPO, Aggarwal & Welleck 2025, Eq. 2): r = 1{correct}·clip(α·(n_gold − n_y) + δ, 0, 1).
    ``target_tokens`` and α as in :func:`l1_exact`."""
    n = len(completions)
    correct = _correctness(rewards, correctness_from, correct_threshold, n, "l1_max")
    targets = _targets(target_tokens, n, "l1_max")
    return [
        None if ok is None else float(ok) * min(1.0, max(0.0, alpha * (tg - t) + delta))
        for t, tg, ok in zip(completion_token_counts, targets, correct)
    ]


@register_reward("efficient_sigmoid")
def efficient_sigmoid(
    prompts,
    completions,
    completion_token_counts: list[int],
    group_ids: list[int],
    rewards: Optional[dict] = None,
    alpha: float = 0.2,
    correctness_from: str = "accuracy",
    correct_threshold: float = 1.0,
    **_,
) -> list[Optional[float]]:
    """Arora & Zanette 2025 ("Training Language Models to Reason Efficiently", Eq. 3):
    r = 1{correct}·(1 − α·σ((len − mean_c)/std_c)), mean_c / std_c over the correct samples of the same prompt."""
    n = len(completions)
    correct = _correctness(rewards, correctness_from, correct_threshold, n, "efficient_sigmoid")
    out: list[Optional[float]] = [None if ok is None else 0.0 for ok in correct]
    for idx in _groups(group_ids).values():
        ok_lens = [completion_token_counts[i] for i in idx if correct[i]]
        if not ok_lens:
            continue
        mean = sum(ok_lens) / len(ok_lens)
        std = math.sqrt(sum((x - mean) ** 2 for x in ok_lens) / len(ok_lens))
        for i in idx:
            if correct[i]:
                z = (completion_token_counts[i] - mean) / (std + 1e-6)
                out[i] = 1.0 - alpha / (1.0 + math.exp(-z))
    return out
