"""Token-efficiency metrics of an evaluation: pass@k, length statistics, and the change against a base.

Pure functions over per-sample records (no model, no vLLM), so they are tested in milliseconds. This is
the one definition of each held-out figure: the trainer's baseline/final/periodic evaluations, ``gdpo
eval``, ``gdpo compress`` and the tiny policy's build all call ``held_out_metrics``, so the same name
means the same number in ``summary.json``, ``results.json`` and ``compress.json``.

- correct: a sample whose correctness reward (``rewards.correctness``, ``accuracy`` by default) scores
  at least 1; an unscored sample (None / NaN) is not correct. accuracy is the share of correct samples.
- token percentiles (median, p90) interpolate linearly between order statistics (numpy's default).

- pass@k: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
  Code", Eq. 1): ``1 - C(n-c, k) / C(n, k)`` per prompt with n samples of which c are correct, averaged
  over prompts. pass@1 is the mean accuracy over all samples.
- The floor: where the data knows each problem's shortest correct solution (a ``shortest_solution``
  column, e.g. the chain-arithmetic task), ``floor_tokens`` is its mean length in tokens (EOS counted,
  as completion lengths are), ``tokens_over_floor`` the mean completion length over it,
  ``below_floor_rate`` the share of completions shorter than their problem's floor, and
  ``shortcut_rate`` the share of completions that are correct yet skip a line of the shortest solution
  (its lines before the final answer must appear in order).
- AES, the accuracy-efficiency score of O1-Pruner (Luo et al., 2025):
  with ``ΔL = (L_base - L) / L_base`` and ``ΔA = (A - A_base) / A_base``,
  ``AES = α·ΔL + β·ΔA`` when ``ΔA >= 0`` and ``α·ΔL + γ·ΔA`` (a loss weighs more) otherwise;
  α = 1, β = 3, γ = 5 as in the paper. Higher is better; 0 is the base itself.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

AES_COEFFICIENTS = {"alpha": 1.0, "beta": 3.0, "gamma": 5.0}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the stable form of 1 - C(n-c, k)/C(n, k)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), numpy's default method."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(
    correct: Sequence[bool],
    tokens: Sequence[int],
    truncated: Sequence[bool],
    group_ids: Sequence[int],
    ks: Sequence[int] = (),
) -> dict[str, float]:
    """Metrics over N samples (``group_ids`` says which prompt each belongs to; groups are the same size)."""
    n = len(correct)
    if not (n == len(tokens) == len(truncated) == len(group_ids)) or n == 0:
        raise ValueError(
            f"summarize needs equal, non-empty lists; got {n}, {len(tokens)}, {len(truncated)}, {len(group_ids)}"
        )
    groups: dict[int, list[bool]] = {}
    for g, c in zip(group_ids, correct):
        groups.setdefault(g, []).append(bool(c))
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got sizes {sorted(sizes)}")
    per_prompt = sizes.pop()
    acc = _mean([float(c) for c in correct])
    mean_tokens = _mean(tokens)
    out = {
        "accuracy": acc,
        "pass@1": acc,
        "mean_tokens": mean_tokens,
        "median_tokens": statistics.median(tokens),
        "p90_tokens": percentile(tokens, 90),
        "mean_tokens_correct": _mean([t for t, c in zip(tokens, correct) if c]),
        "mean_tokens_incorrect": _mean([t for t, c in zip(tokens, correct) if not c]),
        "truncation_rate": _mean([float(t) for t in truncated]),
        "accuracy_per_1k_tokens": 1000 * acc / mean_tokens if mean_tokens else float("nan"),
        "prompts": len(groups),
        "samples_per_prompt": per_prompt,
        "samples": n,
    }
    for k in sorted(set(ks) | {per_prompt}):
        if 1 <= k <= per_prompt:
            out[f"pass@{k}"] = _mean([pass_at_k(per_prompt, sum(v), k) for v in groups.values()])
    return out


def is_correct(score) -> bool:
    """The module's one definition of a correct sample: its correctness reward is at least 1 (None and
    NaN, an answer the verifier could not score, are not correct)."""
    return score is not None and score >= 1.0  # NaN >= 1.0 is False


def reward_means(values: Sequence[Sequence[float]], names: Sequence[str]) -> dict[str, float]:
    """``reward/NAME/mean`` over the samples each reward scored (NaN = unscored, left out)."""
    out = {}
    for k, name in enumerate(names):
        scored = [v[k] for v in values if v[k] == v[k]]
        out[f"reward/{name}/mean"] = sum(scored) / len(scored) if scored else float("nan")
    return out


def held_out_metrics(
    correct: Sequence[bool],
    tokens: Sequence[int],
    truncated: Sequence[bool],
    group_ids: Sequence[int],
    completions: Sequence[str],
    floors: Sequence[int] | None = None,
    shortest: Sequence[str] | None = None,
    ks: Sequence[int] = (),
) -> dict[str, float]:
    """Every held-out figure over N samples: ``summarize``, plus the floor figures where the data knows
    each sample's floor (``floors`` and ``shortest``, per sample)."""
    out = summarize(correct, tokens, truncated, group_ids, ks)
    if floors is not None and shortest is not None:
        out.update(floor_metrics(tokens, floors, correct, completions, shortest))
    return out


def skips_required_steps(completion: str, shortest_solution: str) -> bool:
    """Whether ``completion`` lacks a line of the shortest solution (all but its answer line), in order."""
    lines = iter(line.strip() for line in completion.splitlines())
    return not all(
        any(line == need for line in lines) for need in (x.strip() for x in shortest_solution.splitlines()[:-1])
    )


def floor_metrics(
    tokens: Sequence[int],
    floors: Sequence[int],
    correct: Sequence[bool],
    completions: Sequence[str],
    shortest: Sequence[str],
) -> dict[str, float]:
    """The floor figures of the module docstring over N samples (per-sample floor and shortest solution)."""
    floor = _mean(floors)
    return {
        "floor_tokens": floor,
        "tokens_over_floor": _mean(tokens) / floor if floor else float("nan"),
        "below_floor_rate": _mean([float(t < f) for t, f in zip(tokens, floors)]),
        "shortcut_rate": _mean(
            [float(bool(c) and skips_required_steps(text, s)) for c, text, s in zip(correct, completions, shortest)]
        ),
    }


def aes(
    accuracy: float,
    mean_tokens: float,
    base_accuracy: float,
    base_mean_tokens: float,
    alpha: float = 1.0,
    beta: float = 3.0,
    gamma: float = 5.0,
) -> float:
    """Accuracy-efficiency score against a base (module docstring); nan when the base has 0 accuracy or tokens."""
    if base_accuracy <= 0 or base_mean_tokens <= 0:
        return float("nan")
    d_len = (base_mean_tokens - mean_tokens) / base_mean_tokens
    d_acc = (accuracy - base_accuracy) / base_accuracy
    return alpha * d_len + (beta if d_acc >= 0 else gamma) * d_acc


def against_base(metrics: dict, base: dict) -> dict[str, float]:
    """Token reduction %, accuracy change (points) and AES of ``metrics`` against ``base`` (both from summarize)."""
    return {
        "token_reduction_pct": 100 * (1 - metrics["mean_tokens"] / base["mean_tokens"])
        if base["mean_tokens"]
        else float("nan"),
        "accuracy_change_pt": 100 * (metrics["accuracy"] - base["accuracy"]),
        "aes": aes(
            metrics["accuracy"], metrics["mean_tokens"], base["accuracy"], base["mean_tokens"], **AES_COEFFICIENTS
        ),
        "aes_coefficients": dict(AES_COEFFICIENTS),
    }
