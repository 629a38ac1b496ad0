"""The actor cluster: placement, work splitting, weight sync and worker restarts.

Rollout and reward workers are stateless between steps (a rollout worker's only state is its
policy version, re-sent after a restart), so a dead one is replaced and its share retried. A dead
learner holds optimizer state the run cannot rebuild: the step stops with an error and
``resume=auto`` continues from the last checkpoint.

Nothing here assumes one node: learners meet on learner rank 0's node (its IP, a port free there),
each engine gets the weights by the transport its node allows (``actors/sync.py``), and
``cluster.learner_resources`` / ``cluster.rollout_resources`` pin roles to nodes.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import placement
from actors.learner import LearnerWorker
from actors.rewards import RewardWorker
from actors.rollout import RolloutWorker
from actors.sync import EngineSync, LearnerFailed, learner_failed
from gdpo import learner as learner_fns
from gdpo.config import Config
from gdpo.records import (
    RolloutBatch,
    SamplingSettings,
    SyncReport,
    TrainBatch,
    UpdateStats,
    UpdateSums,
    WeightUpdate,
)
from rewards import RewardMatrix, RewardTimeout

__all__ = ["Cluster", "LearnerFailed", "WorkerFailed", "ray_init"]

WORKER_DIED = (RayActorError, ActorDiedError, ActorUnavailableError)


class WorkerFailed(RuntimeError):
    """A rollout or reward worker kept failing (past its retries in a step or ``cluster.max_restarts``)."""


@dataclass
class PendingRollout:
    """A rollout started by ``Cluster.submit_generate``: the per-worker call (for retries) and its refs."""

    call: Callable
    indices: list[int]
    refs: dict


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class Cluster:
    def __init__(self, cfg: Config, model_path: str, log: Callable[[str], None] = print):
        self.cfg, self.model_path, self.log = cfg, model_path, log
        self.placement = placement.plan(cfg, placement.cluster_has_gpus())  # the cluster's GPUs, not the driver's
        self.use_gpu, self.tp = self.placement.use_gpu, self.placement.tp
        self.run_id = uuid.uuid4().hex[:8]
        self.version = 0
        self.update_msg: Optional[WeightUpdate] = None
        self.restarts = {"rollout": 0, "reward": 0}
        self.learners, self.rollouts, self.reward_workers, self.pg, self.weights = [], [], [], None, None
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        self._make_placement()
        m = cfg.learner.num_workers
        self.learners = [
            LearnerWorker.options(name=f"gdpo-learner-{self.run_id}-{i}", **self._learner_opts(i)).remote(
                i, m, self.model_path, cfg, self.run_id
            )
            for i in range(m)
        ]
        self.rendezvous = self._learner_call([self.learners[0].rendezvous_endpoint.remote()], "start")[0]
        started = [w.start.remote(*self.rendezvous) for w in self.learners]
        self.reward_workers = [self._new_reward(i) for i in range(cfg.rewards.num_workers)]
        manifest, adapter_config = self._start_engines(started)
        self.weights = EngineSync(
            cfg,
            self.learners,
            manifest,
            self.run_id,
            "nccl" if self.use_gpu else "gloo",
            self.tp,
            self.log,
            adapter_config=adapter_config,
        )
        for i, actor in enumerate(self.rollouts):
            self.weights.place(i, actor, self._shares_learner0_device(i))
        try:
            ray.get([w.pid.remote() for w in self.reward_workers], timeout=cfg.cluster.rollout_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"the reward workers did not start within cluster.rollout_timeout_s="
                f"{cfg.cluster.rollout_timeout_s:g} s (a reward plugin hanging at import?)"
            ) from None
        self.pad_id = self._learner_call([self.learners[0].pad_token_id.remote()], "start")[0]
        files, members = self.weights.file_engines(), self.weights.members()
        self.log(
            f"weight sync ({'the LoRA adapter' if cfg.learner.syncs_adapter else 'merged weights'}): "
            f"{len(files)} engine(s) by file on learner 0's node, {len(members)} by "
            f"{'nccl' if self.use_gpu else 'gloo'} broadcast"
        )

    def _start_engines(self, learners_started: list) -> tuple[list, Optional[str]]:
        """Start the engines beside the learners' start; returns learner 0's sync manifest and adapter config
        (``LearnerWorker.start``). Engines on the
        learners' GPUs start once the learners hold their memory: vLLM's start-up profiling would count
        memory DeepSpeed allocates (or frees) meanwhile as its own. Elsewhere they start meanwhile."""
        shared = self.placement.use_gpu and self.placement.colocated
        if not shared:
            self.rollouts = [self._spawn_rollout(i) for i in range(self.cfg.rollout.num_workers)]
        manifest = self._learner_call(learners_started, "start")[0]  # DeepSpeed's init: the first run JIT-builds
        if shared:
            self.rollouts = [self._spawn_rollout(i) for i in range(self.cfg.rollout.num_workers)]
        return manifest

    # ------------------------------------------------------------------ placement
    def _make_placement(self) -> None:
        bundles = self.placement.bundles
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=120)
        except GetTimeoutError:
            raise RuntimeError(
                f"Ray could not place the run's {len(bundles)} bundles {bundles} within 120 s: the cluster "
                f"lacks those resources ({ray.available_resources()} free). Check "
                "cluster.learner_resources / rollout_resources and the nodes' --resources"
            ) from None

    def _strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)

    def _shares_learner0_device(self, i: int) -> bool:
        return self.placement.shares_learner0_device(i)

    def _learner_opts(self, i: int) -> dict:
        return {
            **self.placement.learner_options(i),
            "scheduling_strategy": self._strategy(self.placement.learner_bundle[i]),
        }

    def _spawn_rollout(self, i: int):
        name = f"gdpo-rollout-{self.run_id}-{i}-{self.restarts['rollout']}"
        return RolloutWorker.options(
            **self.placement.rollout_options(i),
            scheduling_strategy=self._strategy(self.placement.rollout_bundle[i]),
            name=name,
        ).remote(self.model_path, self.cfg, self.cfg.trainer.seed + i)

    def _count_restart(self, kind: str, i: int, why: str) -> None:
        """One more restart of a ``kind`` worker: past ``cluster.max_restarts`` over the run the run stops
        (a worker that dies every step would be rebuilt forever); else back off 2^(n-1) s, at most 60."""
        n, limit = self.restarts[kind] + 1, self.cfg.cluster.max_restarts
        if n > limit:
            raise WorkerFailed(
                f"{kind} worker {i} {why}, and the run's {kind} workers have been restarted "
                f"{limit} times already (cluster.max_restarts={limit}). The run stopped; fix the "
                "cause (the worker's log above), then resubmit to resume from the last checkpoint, "
                "or raise cluster.max_restarts"
            )
        self.restarts[kind] = n
        delay = min(60.0, 2.0 ** (n - 1))
        self.log(f"{kind} worker {i} {why}; restarting it in {delay:g} s (restart {n} of at most {limit})")
        time.sleep(delay)

    def _replace_rollout(self, i: int, catch_up: bool = True, attempts: int = 3, why: str = "failed"):
        """Kill rollout worker i (it may only be hung), start a new one in its bundle and bring it to the
        current policy version before it samples. Ray moves the bundle off a dead node once that node is
        declared dead; a replacement placed there before that dies unstarted and is tried again."""
        self._count_restart("rollout", i, why)
        for attempt in range(attempts):
            try:
                ray.kill(self.rollouts[i], no_restart=True)
            except Exception:  # already gone
                pass
            self.rollouts[i] = self._spawn_rollout(i)
            try:
                transport = self.weights.place(i, self.rollouts[i], self._shares_learner0_device(i))
                break
            except WORKER_DIED as err:
                if attempt == attempts - 1:
                    raise RuntimeError(f"rollout worker {i} could not be restarted ({attempts} tries): {err}") from err
                self.log(
                    f"the replacement of rollout worker {i} died before it started (its node lost?); "
                    f"trying again in {2**attempt * 2} s"
                )
                time.sleep(2**attempt * 2)
        if catch_up and self.version > 0:
            self.weights.catch_up(i, self.rollouts[i], self.version, self.update_msg)
        self.log(f"rollout worker {i} restarted on node {self.weights.nodes[i][:12]} ({transport} sync)")
        return self.rollouts[i]

    def _new_reward(self, i: int):
        return RewardWorker.options(num_cpus=0).remote(self.cfg.rewards.specs(), self.cfg.rewards.timeout_s)

    def _replace_reward(self, i: int, why: str) -> None:
        self._count_restart("reward", i, why)
        try:
            ray.kill(self.reward_workers[i], no_restart=True)  # it may only be hung: it must not score on
        except Exception:  # already gone
            pass
        self.reward_workers[i] = self._new_reward(i)

    # ------------------------------------------------------------------ work
    def generate(
        self, prompts: list[str], samples_per_prompt: int, sampling: SamplingSettings, seed: int
    ) -> RolloutBatch:
        """Split prompts over the rollout workers; a worker that dies is replaced and its share retried."""
        return self.collect(self.submit_generate(prompts, samples_per_prompt, sampling, seed))

    def submit_generate(
        self, prompts: list[str], samples_per_prompt: int, sampling: SamplingSettings, seed: int
    ) -> "PendingRollout":
        """Start a rollout on the engines' current policy version and return at once (``collect`` gets it)."""
        shares = _split(len(prompts), len(self.rollouts))

        def call(i: int):
            lo, hi = shares[i]
            return self.rollouts[i].generate.remote(
                self.version, prompts[lo:hi], samples_per_prompt, sampling.kwargs(seed + lo)
            )

        indices = [i for i, (lo, hi) in enumerate(shares) if hi > lo]
        return PendingRollout(call, indices, {i: call(i) for i in indices})

    def wait(self, pending: "PendingRollout") -> None:
        """Block until every share of a started rollout has finished (or failed), without fetching it."""
        ray.wait(list(pending.refs.values()), num_returns=len(pending.refs), fetch_local=False)

    def collect(self, pending: "PendingRollout") -> RolloutBatch:
        """The started rollout's batch; a worker that died is replaced and its share retried on the
        engines' current version (the oldest version in the batch is the one it reports)."""
        parts = self._gather_with_restarts(pending.call, pending.indices, "rollout", first=pending.refs)
        oldest = min(p.policy_version for p in parts)
        for p in parts:
            p.policy_version = oldest  # each token's sampler log-prob is kept, so the ratio stays correct
        return RolloutBatch.concat(parts)

    def score(self, batch: RolloutBatch, prompts: list[str], columns: dict[str, list]) -> RewardMatrix:
        """Split whole groups over the reward workers (group rewards need their whole group)."""
        groups = max(batch.group_ids) + 1
        k = len(batch) // groups
        shares = [(lo * k, hi * k) for lo, hi in _split(groups, len(self.reward_workers))]
        counts = batch.completion_token_counts

        def call(i: int):
            lo, hi = shares[i]
            return self.reward_workers[i].score.remote(
                prompts[lo:hi],
                batch.completions[lo:hi],
                counts[lo:hi],
                batch.group_ids[lo:hi],
                {c: v[lo:hi] for c, v in columns.items()},
            )

        parts = self._gather_with_restarts(call, [i for i, (lo, hi) in enumerate(shares) if hi > lo], "reward")
        return RewardMatrix(names=parts[0].names, values=torch.cat([p.values for p in parts]))

    def _deadline(self, kind: str) -> float:
        if kind == "rollout":
            return self.cfg.cluster.rollout_timeout_s
        # each reward bounds itself in the worker (rewards.timeout_s); this catches a call stuck where
        # a signal cannot reach it (inside C code)
        return self.cfg.rewards.timeout_s * len(self.cfg.rewards.functions) + 30.0

    def _gather_with_restarts(
        self, call, indices: list[int], kind: str, attempts: int = 3, first: Optional[dict] = None
    ) -> list:
        """``call(i)`` for each worker i; a worker that dies, misses its deadline, or whose reward timed
        out is killed, replaced (``cluster.max_restarts``) and its share retried, up to ``attempts``."""
        results: dict[int, object] = {}
        pending = list(indices)
        limit = self._deadline(kind)
        for attempt in range(attempts):
            refs = first if (attempt == 0 and first is not None) else {i: call(i) for i in pending}
            pending = []
            deadline = time.monotonic() + limit
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref, timeout=max(1e-3, deadline - time.monotonic()))
                    continue
                except WORKER_DIED as err:
                    why = f"died ({type(err).__name__})"
                except GetTimeoutError:
                    key = "cluster.rollout_timeout_s" if kind == "rollout" else "rewards.timeout_s"
                    why = f"did not answer within {limit:g} s ({key})"
                except RewardTimeout as err:  # raised in the worker: the reward, not the actor, is named
                    why = "timed out: " + str(getattr(err, "cause", None) or err).strip().splitlines()[-1]
                if attempt == attempts - 1:
                    raise WorkerFailed(
                        f"{kind} worker {i} {why}, on {attempts} tries in one step; the run stopped. "
                        "Resubmit to resume from the last checkpoint once the cause is fixed"
                    )
                if kind == "rollout":
                    self._replace_rollout(i, why=why)
                else:
                    self._replace_reward(i, why)
                pending.append(i)
            if not pending:
                break
        return [results[i] for i in indices]

    def _learner_call(self, refs: list, what: str = "call") -> list:
        limit = self.cfg.cluster.learner_timeout_s
        try:
            return ray.get(refs, timeout=limit)
        except WORKER_DIED as err:
            raise learner_failed(f"a learner worker died during its {what}") from err
        except RayTaskError as err:  # e.g. a full disk under a checkpoint: one line, the worker's log has the rest
            cause = err.cause if getattr(err, "cause", None) is not None else err
            first = (str(cause).strip().splitlines() or [""])[-1]
            raise LearnerFailed(
                f"a learner's {what} raised {type(cause).__name__}: {first} (the traceback is in "
                "the worker's log above); the run stopped"
            ) from err
        except GetTimeoutError:
            hint = (
                (
                    " (a first start JIT-builds DeepSpeed's CPU op under ~/.cache/torch_extensions: a start killed "
                    "during that build leaves a lock file there that makes every later start wait)"
                )
                if what == "start"
                else ""
            )
            raise learner_failed(
                f"a learner's {what} did not finish within cluster.learner_timeout_s={limit:g} s{hint}"
            ) from None

    def logprobs(self, batch: TrainBatch) -> TrainBatch:
        """Old log-probs where the update needs a pass for them, and the reference's when KL is on;
        the batch unchanged (no round trip) when neither is needed (see ``learner.needs_old_logprobs``)."""
        if not learner_fns.needs_logprob_pass(self.cfg):
            return batch
        shares = _split(len(batch), len(self.learners))
        return TrainBatch.concat(
            self._learner_call(
                [w.logprobs.remote(batch.slice(lo, hi)) for w, (lo, hi) in zip(self.learners, shares)], "log-prob pass"
            )
        )

    def update(self, batch: TrainBatch) -> UpdateStats:
        """``learner.updates_per_step`` optimizer steps over the batch, data parallel."""
        m = len(self.learners)
        per_step: list[UpdateSums] = []
        for ulo, uhi in _split(len(batch), self.cfg.learner.updates_per_step):
            mini = batch.slice(ulo, uhi)
            tokens = float(mini.loss_mask[:, 1:].sum())
            parts = self._learner_call(
                [
                    w.update.remote(mini.slice(lo, hi), tokens, float(len(mini)))
                    for w, (lo, hi) in zip(self.learners, _split(len(mini), m))
                ],
                "update",
            )
            per_step.append(sum(parts[1:], parts[0]))
        return UpdateStats.from_sums(per_step)

    def sleep_engines(self) -> None:
        """``rollout.sleep_level`` > 0: engines give their GPU memory to the learners' update."""
        if self.cfg.rollout.sleep_level:
            level = self.cfg.rollout.sleep_level
            self._gather_with_restarts(
                lambda i: self.rollouts[i].sleep.remote(level), list(range(len(self.rollouts))), "rollout"
            )

    def wake_engines(self) -> None:
        """Undo ``sleep_engines`` before the sync (a replaced engine is awake already; waking it is harmless)."""
        if self.cfg.rollout.sleep_level:
            level = self.cfg.rollout.sleep_level
            self._gather_with_restarts(
                lambda i: self.rollouts[i].wake.remote(level), list(range(len(self.rollouts))), "rollout"
            )

    def sync(self) -> SyncReport:
        """Publish the next policy version (merged weights, or the LoRA adapter) and load it into every engine."""
        t0 = time.perf_counter()
        msg = self.weights.publish(
            self.version + 1,
            self.rollouts,
            lambda i: self._replace_rollout(i, catch_up=False, why="failed the weight sync"),
        )
        self.version, self.update_msg = msg.version, msg
        t1 = time.perf_counter()

        def call(i: int):  # a file engine replaced meanwhile on another node has caught up already
            if self.weights.transport[i] == "file":
                return self.rollouts[i].load_file.remote(msg)
            return self.rollouts[i].policy_version.remote()

        files = self.weights.file_engines()
        self._gather_with_restarts(call, files, "rollout")
        return SyncReport(
            version=msg.version,
            num_bytes=msg.num_bytes,
            publish_s=t1 - t0,
            load_s=time.perf_counter() - t1,
            file_engines=len(files),
            collective_engines=len(self.weights.members()),
        )

    def save_final(self, directory: str) -> None:
        self._learner_call([w.save_final.remote(directory) for w in self.learners], "final save")

    def adapter_checksums(self) -> list[str]:
        return self._learner_call([w.adapter_checksum.remote() for w in self.learners], "checksum")

    def save(self, directory: str) -> None:
        self._learner_call([w.save.remote(directory) for w in self.learners], "checkpoint save")

    def load(self, directory: str) -> None:
        self._learner_call([w.load.remote(directory) for w in self.learners], "checkpoint load")

    def resume(self, directory: str, version: int) -> SyncReport:
        """Load a checkpoint into the learners and put its policy, as ``version``, into every engine."""
        self.load(directory)
        self.version = version - 1
        return self.sync()

    def shutdown(self) -> None:
        if self.weights is not None and self.learners:
            try:
                self.weights.close(self.rollouts)  # learner 0 removes its weight files
            except Exception as err:  # noqa: BLE001 - the run is ending; say what may be left behind
                self.log(f"weight sync teardown failed ({err}); /dev/shm may hold gdpo-weights-{self.run_id}-* files")
        for a in self.learners + self.rollouts + self.reward_workers:
            try:
                ray.kill(a)
            except Exception:  # already gone: nothing to release
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)


def ray_init(cfg: Config) -> None:
    """Join the cluster this driver runs in (a Ray job: RAY_ADDRESS), else ``cluster.address``, else
    start an embedded Ray."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.cluster.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # "local": a new Ray of its own, even where `ray start` runs on this machine (None would join it)
        ray.init(
            address="local",
            num_cpus=cfg.cluster.num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={
                "env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
            },
        )
