"""LearnerWorker: a Ray actor holding one DeepSpeed rank of the policy with DoRA adapters."""
from __future__ import annotations

import ray

from gdpo import learner
from gdpo.config import Config
from gdpo.records import TrainBatch, WeightUpdate


@ray.remote
class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str, cfg: Config):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.threads = learner.set_cpu_threads(cfg)
        learner.init_distributed(rank, world_size, master_addr, master_port)
        self.model, self.tokenizer = learner.build_policy(model_path, cfg)
        self.engine = learner.make_engine(self.model, cfg)
        self.sync_names = learner.sync_module_names(self.model, cfg.learner.target_modules)

    def logprobs(self, batch: TrainBatch) -> TrainBatch:
        return learner.attach_logprobs(self.model, batch, self.cfg)

    def update(self, batch: TrainBatch, global_tokens: float, global_seqs: float) -> dict:
        return learner.train_step(self.engine, batch, self.cfg, global_tokens=global_tokens,
                                  global_seqs=global_seqs, world_size=self.world_size)

    def publish(self, version: int, directory: str) -> WeightUpdate | None:
        return learner.publish_weights(self.model, self.sync_names, version, directory, self.rank,
                                       self.cfg.learner.zero_stage, self.cfg.learner.sync_bucket_mb)

    def save_final(self, directory: str) -> None:
        learner.save_final(self.model, self.tokenizer, directory, self.rank, self.cfg.learner.zero_stage)

    def save(self, directory: str) -> None:
        learner.save_checkpoint(self.engine, self.model, directory, self.rank, self.cfg.learner.zero_stage)

    def load(self, directory: str) -> None:
        learner.load_checkpoint(self.engine, directory)

    def adapter_checksum(self) -> str:
        return learner.checksum_params(self.model)

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def pid(self) -> int:
        import os
        return os.getpid()
