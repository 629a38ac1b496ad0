"""RewardWorker: a Ray actor that scores a share of the completions with every configured reward."""

from __future__ import annotations

import ray

from rewards import BoundReward, RewardMatrix, score_rewards


@ray.remote
class RewardWorker:
    def __init__(self, specs: list[tuple[str, dict]], timeout_s: float):
        self.rewards = [BoundReward.from_name(name, kwargs) for name, kwargs in specs]
        for reward in self.rewards:
            reward.warm_up()
        self.timeout_s = timeout_s  # per reward call; the actor's tasks run on its main thread, where it can fire

    def score(self, prompts, completions, completion_token_counts, group_ids, columns) -> RewardMatrix:
        return score_rewards(
            self.rewards, prompts, completions, completion_token_counts, group_ids, columns, timeout_s=self.timeout_s
        )

    def pid(self) -> int:
        import os

        return os.getpid()
