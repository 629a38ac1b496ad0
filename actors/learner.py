"""LearnerWorker: a Ray actor holding one DeepSpeed rank of the policy with DoRA adapters.

Started in two calls so that the ranks meet on learner rank 0's node: ``rendezvous_endpoint`` on
rank 0 (its node IP and a port free there), then ``start`` on every rank.
"""

from __future__ import annotations

import os
import shutil

import ray

from gdpo import learner, learner_sync, sync_transport, weight_sync
from gdpo.config import Config
from gdpo.records import SyncGroup, TrainBatch, WeightUpdate


@ray.remote
class LearnerWorker:
    def __init__(self, rank: int, world_size: int, model_path: str, cfg: Config, run_id: str):
        self.rank, self.world_size, self.model_path, self.cfg, self.run_id = rank, world_size, model_path, cfg, run_id
        self.threads = learner.set_cpu_threads(cfg)
        self.comm = self.listen = self.rendezvous_sock = self.weights_dir = None
        self.published, self.dirty = 0, False  # the version last published; weights changed since?

    def node(self) -> tuple[str, str]:
        """(Ray node id, node IP) of this learner."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def rendezvous_endpoint(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a port it holds open for the learners' rendezvous."""
        self.rendezvous_sock = sync_transport.listen_socket(ray.util.get_node_ip_address())
        return self.rendezvous_sock.getsockname()[:2]

    def start(self, master_addr: str, master_port: int) -> tuple[list, str | None]:
        """Join the DeepSpeed world, build the policy and its engine; returns the sync manifest and, for an
        adapter sync, the adapter's config (JSON) that the engines on the broadcast write beside it."""
        sock, self.rendezvous_sock = self.rendezvous_sock, None
        learner.init_distributed(
            self.rank, self.world_size, master_addr, master_port, listen_fd=sock.detach() if sock is not None else None
        )
        self.model, self.tokenizer = learner.build_policy(self.model_path, self.cfg)
        self.engine = learner.make_engine(self.model, self.cfg)
        self.sync_names = weight_sync.sync_module_names(self.model, self.cfg.learner.target_modules)
        ln = self.cfg.learner
        return learner_sync.sync_manifest(self.model, self.sync_names, ln.zero_stage, ln.syncs_adapter)

    def logprobs(self, batch: TrainBatch) -> TrainBatch:
        return learner.attach_logprobs(self.model, batch, self.cfg)

    def policy_logprobs(self, batch: TrainBatch):
        """``[N, L-1]`` log-probs of the batch's tokens under this rank's current policy, processed as the
        sampler's (for checks)."""
        ln = self.cfg.learner
        return learner.sequence_logprobs(
            self.model,
            batch,
            ln.micro_batch_per_worker,
            max_tokens=ln.max_tokens_per_micro_batch,
            sampling=learner.sampler_processing(self.cfg),
        )

    def update(self, batch: TrainBatch, global_tokens: float, global_seqs: float) -> dict:
        self.dirty = True
        return learner.update(
            self.engine,
            batch,
            self.cfg,
            global_tokens=global_tokens,
            global_seqs=global_seqs,
            world_size=self.world_size,
        )

    # ------------------------------------------------------------------ weight sync
    def sync_endpoint(self) -> tuple[str, int]:
        """Rank 0: a socket listening on this node's IP for the next broadcast group's store."""
        self.listen = sync_transport.listen_socket(ray.util.get_node_ip_address())
        return self.listen.getsockname()[:2]

    def open_sync_group(self, spec: SyncGroup) -> None:
        """Rank 0 joins as the group's rank 0 (returns once every engine worker has joined)."""
        self.close_sync_group()
        listen, self.listen = self.listen, None
        self.comm = sync_transport.open_comm(spec, 0, learner.device_of(self.model), listen)

    def close_sync_group(self) -> None:
        if self.comm is not None:
            self.comm.close()  # peers still waiting on this group fail at once instead of at their deadline
            self.comm = None

    def publish(self, version: int, to_file: bool, broadcast: bool, resend: bool = False) -> WeightUpdate | None:
        """Publish ``version`` (``resend``: the version already published, for an engine catching up)."""
        if resend and (self.dirty or version != self.published):
            raise RuntimeError(
                f"learner {self.rank} cannot re-send policy version {version}: it holds version "
                f"{self.published}{' with updates since' if self.dirty else ''}"
            )
        if to_file and self.rank == 0 and self.weights_dir is None:
            self.weights_dir = sync_transport.make_weights_dir(self.run_id)
        msg = learner_sync.publish_weights(
            self.model,
            self.sync_names,
            version,
            rank=self.rank,
            zero_stage=self.cfg.learner.zero_stage,
            bucket_mb=self.cfg.learner.sync_bucket_mb,
            directory=self.weights_dir if to_file else None,
            comm=self.comm if broadcast else None,
            adapter=self.cfg.learner.syncs_adapter,
        )
        self.published, self.dirty = version, False
        return msg

    def shutdown_sync(self) -> None:
        self.close_sync_group()
        if self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def save_final(self, directory: str) -> None:
        learner.save_final(self.model, self.tokenizer, directory, self.rank, self.cfg.learner.zero_stage)

    def save(self, directory: str) -> None:
        learner.save_checkpoint(self.engine, self.model, directory, self.rank, self.cfg.learner.zero_stage)

    def load(self, directory: str) -> None:
        learner.load_checkpoint(self.engine, directory)
        self.dirty = True  # the loaded weights are not the published version

    def adapter_checksum(self) -> str:
        return learner.checksum_params(self.model, self.cfg.learner.zero_stage)

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def pid(self) -> int:
        return os.getpid()
