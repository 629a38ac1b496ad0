"""RolloutWorker: a Ray actor that owns one vLLM engine."""
from __future__ import annotations

import ray

from gdpo import rollout
from gdpo.config import Config
from gdpo.records import RolloutBatch, WeightUpdate


@ray.remote
class RolloutWorker:
    def __init__(self, model_path: str, cfg: Config, seed: int = 0):
        self.llm = rollout.make_engine(model_path, cfg, seed)

    def generate(self, expected_version: int, prompts: list[str], samples_per_prompt: int, sampling: dict) -> RolloutBatch:
        return rollout.generate_checked(self.llm, expected_version, prompts, samples_per_prompt, **sampling)

    def load_weights(self, update: WeightUpdate) -> int:
        return rollout.load_weights(self.llm, update)

    def sequence_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        return rollout.sequence_logprobs(self.llm, prompt_ids, completion_ids)

    def pid(self) -> int:
        import os
        return os.getpid()
