"""Reward functions: a registry (plugin point) and the built-ins. Pure Python + math-verify; no Ray.

from rewards import register_reward

@register_reward("short_answer")
def short_answer(prompts, completions, completion_token_counts, **fields):
    return [1.0 if n < 50 else 0.0 for n in completion_token_counts]
"""

from rewards.registry import (
    BoundReward,
    RewardError,
    RewardTimeout,
    register_reward,
    registered_rewards,
    resolve_reward,
)
from rewards.matrix import RewardMatrix, score_rewards

get_reward = resolve_reward

__all__ = [
    "BoundReward",
    "RewardError",
    "RewardMatrix",
    "RewardTimeout",
    "get_reward",
    "register_reward",
    "registered_rewards",
    "resolve_reward",
    "score_rewards",
]
