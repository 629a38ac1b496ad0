"""RolloutWorker: a Ray actor that owns one vLLM engine."""

from __future__ import annotations

import os

import ray

from gdpo import rollout, weight_sync
from gdpo.config import Config
from gdpo.records import RolloutBatch, SyncGroup, WeightUpdate


@ray.remote
class RolloutWorker:
    def __init__(self, model_path: str, cfg: Config, seed: int = 0):
        # an adapter sync serves the policy as a LoRA on the base weights
        lora_rank = cfg.learner.dora_rank if cfg.learner.syncs_adapter else 0
        self.llm = rollout.make_engine(model_path, cfg, seed, lora_rank=lora_rank)
        self.seeded = rollout.seeds_per_prompt(cfg)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def generate(
        self, expected_version: int, prompts: list[str], samples_per_prompt: int, sampling: dict
    ) -> RolloutBatch:
        return rollout.generate_checked(
            self.llm, expected_version, prompts, samples_per_prompt, seeded=self.seeded, **sampling
        )

    def load_file(self, update: WeightUpdate) -> int:
        return weight_sync.engine_load_file(self.llm, update)

    def sync_open(self, spec: SyncGroup, rank_offset: int) -> list[int]:
        return weight_sync.engine_open(self.llm, spec, rank_offset)

    def receive_weights(self, version: int) -> int:
        return weight_sync.engine_receive(self.llm, version)

    def sync_close(self) -> None:
        weight_sync.engine_close(self.llm)

    def sleep(self, level: int) -> None:
        rollout.sleep(self.llm, level)

    def wake(self, level: int) -> None:
        rollout.wake(self.llm, level)

    def policy_version(self) -> int:
        return rollout.engine_version(self.llm)

    def sequence_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        return rollout.sequence_logprobs(self.llm, prompt_ids, completion_ids)

    def pid(self) -> int:
        return os.getpid()
