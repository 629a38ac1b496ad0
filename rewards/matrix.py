"""Score every configured reward over a batch: the ``[N, K]`` reward matrix and its statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from rewards.registry import BoundReward, RewardError


@dataclass
class RewardMatrix:
    names: list[str]  # K reward names, in config order
    values: Tensor  # [N, K] float32, NaN where a reward could not score

    def stats(self) -> dict[str, float]:
        """Per-component mean / std over scored samples and the count of unscored ones."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = self.values[:, k]
            ok = col[~torch.isnan(col)]
            out[f"reward/{name}/mean"] = ok.mean().item() if ok.numel() else math.nan
            out[f"reward/{name}/std"] = ok.std(unbiased=False).item() if ok.numel() else math.nan
            out[f"reward/{name}/unscored"] = float(col.numel() - ok.numel())
        return out


def score_rewards(
    rewards: Sequence[BoundReward],
    prompts: Sequence[str],
    completions: Sequence[str],
    completion_token_counts: Sequence[int],
    group_ids: Sequence[int],
    columns: dict[str, Sequence],
    timeout_s: Optional[float] = None,
) -> RewardMatrix:
    """Run each reward in order; later rewards see the earlier columns in the ``rewards`` field.

    ``columns`` are the dataset columns of each sample (e.g. ``answer``), each a list of N values;
    ``timeout_s`` bounds each reward's call (``BoundReward.score``).
    """
    n = len(completions)
    if len(prompts) != n or len(completion_token_counts) != n or len(group_ids) != n:
        raise RewardError(
            f"batch lengths disagree: {len(prompts)} prompts, {n} completions, "
            f"{len(completion_token_counts)} token counts, {len(group_ids)} group ids"
        )
    for name, col in columns.items():
        if len(col) != n:
            raise RewardError(f"data column '{name}' has {len(col)} values for {n} samples")
    fields = {k: list(v) for k, v in columns.items()}
    fields["completion_token_counts"] = [int(c) for c in completion_token_counts]
    fields["group_ids"] = list(group_ids)
    done: dict[str, list] = {}
    for reward in rewards:
        done[reward.name] = reward.score(prompts, completions, {**fields, "rewards": dict(done)}, timeout_s=timeout_s)
    values = torch.tensor(
        [[math.nan if done[r.name][i] is None else done[r.name][i] for r in rewards] for i in range(n)],
        dtype=torch.float32,
    ).reshape(n, len(rewards))
    return RewardMatrix(names=[r.name for r in rewards], values=values)
