"""The driver loop: sample prompts -> rollout -> rewards -> advantages -> update -> sync -> log/eval/save.

One call per stage; the actors do the work (``actors/cluster.py``), the math lives in
``gdpo/advantages.py`` and ``gdpo/losses.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gdpo.advantages import apply_conditions, gdpo_advantages, grpo_advantages, zero_variance_groups
from gdpo.checkpoints import RunPlan, commit_checkpoint, new_checkpoint_dir, open_run, prune_checkpoints, set_rng_state
from gdpo.config import Config, to_dict
from gdpo.data import PromptSet
from gdpo.fileio import atomic_write_text
from gdpo.eval.metrics import held_out_metrics, is_correct, reward_means
from gdpo.metrics import MetricsLogger, token_stats
from gdpo.trackers import open_trackers
from gdpo.preflight import RunInputs, prepare_run
from gdpo.records import RolloutBatch, SamplingSettings, TrainBatch, UpdateStats


@dataclass
class RunState:
    step: int = 0  # completed training steps
    cursor: int = 0  # prompts consumed from the shuffled training stream
    version: int = 0  # policy version held by the rollout engines


class PromptStream:
    """Prompts in a seeded order, reshuffled each epoch; position = ``cursor`` (resumable). Each epoch's
    order is computed once (a 50,000-row set costs tens of milliseconds to shuffle, not per prompt)."""

    def __init__(self, data: PromptSet, seed: int):
        self.data, self.seed = data, seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.data)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # the last two epochs
            self._orders[epoch] = order
        return self._orders[epoch]

    def take(self, cursor: int, n: int) -> PromptSet:
        idx = []
        for pos in range(cursor, cursor + n):
            epoch, offset = divmod(pos, len(self.data))
            idx.append(self.order(epoch)[offset])
        return self.data.take(idx)


class StageClock:
    """Wall time of the driver's stages within one step; ``report`` adds the derived figures.

    ``time/rollout`` is the generation's own time inside the engine; ``time/rollout_wait`` the time the
    driver was blocked on rollouts. Rollout time on the critical path (all of it, unless the rollout
    ran ahead during the previous step's update) plus the learner's compute is the useful time;
    ``time/overhead_frac`` is the rest of the step (rewards, sync, orchestration, waiting).
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0

    def report(self, rollout_seconds: float, overlapped: bool) -> dict[str, float]:
        step = time.perf_counter() - self.start
        t = {s: self.times.get(s, 0.0) for s in ("rollout_wait", "reward", "logprobs", "update", "sleep", "sync")}
        critical = 0.0 if overlapped else min(rollout_seconds, t["rollout_wait"])
        return {
            **{f"time/{s}": v for s, v in t.items()},
            "time/rollout": rollout_seconds,
            "time/idle": t["rollout_wait"] - critical,
            "time/other": step - sum(t.values()),
            "time/step": step,
            "time/overhead_frac": 1.0 - (critical + t["logprobs"] + t["update"]) / max(step, 1e-9),
        }


def reward_conditions(cfg: Config) -> list:
    """Per reward: None, or (index of the reward it is conditioned on, threshold) (GDPO Eq. 8)."""
    names = [r.name for r in cfg.rewards.functions]
    return [
        None if r.condition_on is None else (names.index(r.condition_on), r.condition_threshold)
        for r in cfg.rewards.functions
    ]


@dataclass
class StepAdvantages:
    values: torch.Tensor  # [N] advantage of each sample; 0 where its group is filtered out
    raw: torch.Tensor  # [N, K] rewards after the conditions (GDPO Eq. 8)
    keep: torch.Tensor  # [N] bool: samples trained on
    flat: torch.Tensor  # [G, K] bool: groups whose reward k is constant


def compute_advantages(values: torch.Tensor, names: list[str], cfg: Config) -> StepAdvantages:
    """Conditioned rewards, the groups kept for training (``algorithm.filter_zero_variance``), then the
    configured estimator over the kept samples only, so that its batch statistics (GDPO's batch
    normalization, GRPO's batch scale) are those of the batch that is trained on, as verl's
    ``filter_groups`` computes them."""
    k = cfg.rollout.samples_per_prompt
    raw = apply_conditions(values, reward_conditions(cfg))
    flat = zero_variance_groups(raw, k)  # [G, K]
    keep = torch.ones(len(raw), dtype=torch.bool)
    if cfg.algorithm.filter_zero_variance:
        cols = [names.index(n) for n in cfg.algorithm.filter_zero_variance]
        keep = (~flat[:, cols].all(1)).repeat_interleave(k)
    adv = torch.zeros(len(raw), dtype=raw.dtype)
    if keep.any():
        weights = [r.weight for r in cfg.rewards.functions]
        if cfg.algorithm.estimator == "gdpo":
            adv[keep] = gdpo_advantages(raw[keep], k, weights, eps=cfg.algorithm.adv_eps)
        else:
            adv[keep] = grpo_advantages(
                raw[keep], k, weights, scale=cfg.algorithm.grpo_scale, eps=cfg.algorithm.adv_eps
            )
    return StepAdvantages(adv, raw, keep, flat)


def evaluate(cluster, cfg: Config, data: PromptSet) -> dict[str, float]:
    """Held-out figures (``gdpo.eval.metrics.held_out_metrics``, the same definitions as ``gdpo eval``)
    with the eval sampling settings, greedy by default; where the data knows each problem's floor (its
    shortest correct solution), the floor figures too."""
    batch = cluster.generate(data.prompts, 1, SamplingSettings.for_held_out(cfg), seed=10**6)
    matrix = cluster.score(batch, data.prompts, data.columns)
    values = matrix.values.tolist()
    acc = matrix.names.index(cfg.rewards.correctness)
    out = held_out_metrics(
        [is_correct(v[acc]) for v in values],
        batch.completion_token_counts,
        [reason == "length" for reason in batch.finish_reasons],
        batch.group_ids,
        batch.completions,
        floors=data.columns.get("floor_tokens"),
        shortest=data.columns.get("shortest_solution"),
    )
    return {**out, **reward_means(values, matrix.names)}


@dataclass
class AheadRollout:
    """The rollout of step ``step`` (completed steps before it): started on the engines, or (from a
    checkpoint) already sampled."""

    step: int
    prompts: PromptSet
    pending: object = None  # the cluster's PendingRollout while it runs
    batch: RolloutBatch | None = None

    def collect(self, cluster) -> RolloutBatch:
        if self.batch is None:
            self.batch = cluster.collect(self.pending)
        return self.batch

    def wait(self, cluster) -> None:
        if self.batch is None:
            cluster.wait(self.pending)


AHEAD_FILE = "rollouts_ahead.json"


def load_rollouts_ahead(
    checkpoint: Path | None, stream: PromptStream, state: RunState, n_prompts: int, cfg: Config
) -> list[AheadRollout]:
    """The sampled rollouts of the steps after ``state.step`` that a checkpoint kept (at most
    ``trainer.max_staleness`` of them, each within that many versions of the learner that will train on it)."""
    path = checkpoint / AHEAD_FILE if checkpoint else None
    if path is None or not path.is_file():
        return []
    out = []
    for row in json.loads(path.read_text())[: cfg.trainer.max_staleness]:
        step = row["step"]
        if step >= cfg.trainer.steps or step - row["batch"]["policy_version"] > cfg.trainer.max_staleness:
            break
        prompts = stream.take(state.cursor + (step - state.step) * n_prompts, n_prompts)
        out.append(AheadRollout(step, prompts, batch=RolloutBatch(**row["batch"])))
    return out


def save_checkpoint(
    cluster,
    state: RunState,
    plan: RunPlan,
    cfg: Config,
    keep: int = 2,
    log: Callable[[str], None] = print,
    ahead: list[tuple[int, RolloutBatch]] = (),
) -> Path:
    """The learners write into a fresh temporary directory; the driver adds its files (``ahead``: the
    sampled rollouts of the next steps) and the manifest, fsyncs and renames it (``gdpo/checkpoints.py``):
    a killed run never leaves a half checkpoint."""
    tmp = new_checkpoint_dir(plan.out, state.step)
    cluster.save(str(tmp))
    if ahead:
        rows = [{"step": step, "batch": dataclasses.asdict(b)} for step, b in ahead]
        atomic_write_text(tmp / AHEAD_FILE, json.dumps(rows))
    final = commit_checkpoint(tmp, dict(state.__dict__), cfg, plan.run_id)
    prune_checkpoints(plan.out, plan.run_id, keep, log)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    free = shutil.disk_usage(final).free
    if free < 2 * size:  # the next save writes a whole checkpoint before the oldest is pruned
        log(
            f"warning: {plan.out} has {free / 2**20:.0f} MiB free and a checkpoint takes {size / 2**20:.0f} MiB; "
            "the next save may fill the disk (the previous checkpoints stay intact if it does)"
        )
    return final


def train(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) GDPO/GRPO training; returns the summary written to ``output_dir/summary.json``."""
    from actors.cluster import Cluster, ray_init

    inputs = prepare_run(cfg, log)  # model, tokenizer, data, templates, context: checked before Ray starts
    plan = open_run(cfg, log)  # the output directory: a new run, or this run's newest intact checkpoint
    if plan.finished:
        log(f"{plan.out} holds this run finished ({cfg.trainer.steps} steps); nothing to do")
        return plan.summary
    _write_json(plan.out / "config.json", to_dict(cfg))
    trackers = open_trackers(cfg, plan.out, to_dict(cfg), initial=_checkpoint_step(plan), log=log)  # before Ray
    try:
        ray_init(cfg)
        cluster = Cluster(cfg, inputs.model_path, log)
        try:
            return _run(cluster, cfg, inputs, plan, log, trackers)
        finally:
            cluster.shutdown()
    finally:
        for tracker in trackers:
            tracker.close()


def _checkpoint_step(plan: RunPlan) -> int:
    """The step the run resumes after (0 for a new run)."""
    if not plan.checkpoint:
        return 0
    return int(json.loads((plan.checkpoint / "trainer_state.json").read_text()).get("step", 0))


def _run(cluster, cfg: Config, inputs: RunInputs, plan: RunPlan, log: Callable[[str], None], trackers=()) -> dict:
    train_data, eval_data = inputs.train, inputs.eval
    stream = PromptStream(train_data, cfg.trainer.seed)
    state, summary, summary_path = RunState(), plan.summary, plan.out / "summary.json"
    if plan.checkpoint:
        ckpt = plan.checkpoint
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
        set_rng_state(json.loads((ckpt / "rng.json").read_text()))
        cluster.resume(str(ckpt), state.version)  # the learners' state, and its policy in every engine
        log(f"resumed from {ckpt} at step {state.step} (policy version {state.version})")
    if "baseline" not in summary:  # measured on the initial policy only (``open_run`` checks): before any update
        summary["baseline"] = evaluate(cluster, cfg, eval_data)
        log(
            f"baseline: accuracy {summary['baseline']['accuracy']:.3f}, mean tokens {summary['baseline']['mean_tokens']:.1f}"
        )
    _write_json(summary_path, summary)  # without an earlier final evaluation: this run is not finished
    metrics = MetricsLogger(plan.out, cfg.trainer.steps, initial=state.step, log=log, trackers=trackers)
    if state.step == 0:  # the trackers' evaluation curves start at the initial policy
        metrics.track({"step": 0, **{f"eval/{k_}": v for k_, v in summary["baseline"].items()}})
    n_prompts, k = cfg.trainer.prompts_per_step, cfg.rollout.samples_per_prompt
    sampling = SamplingSettings.for_rollout(cfg)

    def start_rollout(step: int) -> AheadRollout:  # ``step`` completed steps before it: the same prompts and seed
        prompts = stream.take(state.cursor + (step - state.step) * n_prompts, n_prompts)
        seed = cfg.trainer.seed * 10**7 + step * 10**4
        return AheadRollout(step, prompts, cluster.submit_generate(prompts.prompts, k, sampling, seed=seed))

    # rollouts of the next steps, oldest first, sampled while earlier steps learn (trainer.max_staleness);
    # a checkpoint keeps them, so a resumed run trains on the batches the uninterrupted one would have
    ahead: deque[AheadRollout] = deque(load_rollouts_ahead(plan.checkpoint, stream, state, n_prompts, cfg))
    while state.step < cfg.trainer.steps:
        clock = StageClock()

        # rollout: this step's prompts, sampled on the engines' version (up to max_staleness versions ago)
        with clock("rollout_wait"):
            overlapped = bool(ahead)  # sampled during earlier steps: no rollout time on this step's path
            this = ahead.popleft() if ahead else start_rollout(state.step)
            prompts, rollouts = this.prompts, this.collect(cluster)
        nxt = state.step + 1 + len(ahead)
        while len(ahead) < cfg.trainer.max_staleness and nxt < cfg.trainer.steps:
            ahead.append(start_rollout(nxt))  # sampled on the current version while this step learns
            nxt += 1

        # rewards and advantages: every sample scored, the estimator over the groups kept for training
        with clock("reward"):
            sample_prompts = [p for p in prompts.prompts for _ in range(k)]
            columns = {c: [v for v in vals for _ in range(k)] for c, vals in prompts.columns.items()}
            matrix = cluster.score(rollouts, sample_prompts, columns)
            adv = compute_advantages(matrix.values, matrix.names, cfg)
            batch = TrainBatch.from_rollouts(rollouts, adv.values, cluster.pad_id)
            kept = torch.nonzero(adv.keep).squeeze(1)

        # update: reference log-probs, then learner.updates_per_step optimizer steps (a skip is logged)
        with clock("sleep"):
            cluster.sleep_engines()  # rollout.sleep_level > 0: the engines' GPU memory goes to the update
        learn: UpdateStats | None = None  # None: the update was skipped
        if len(kept) >= len(cluster.learners):
            batch = batch if len(kept) == len(batch) else batch.select(kept)
            with clock("logprobs"):
                batch = cluster.logprobs(batch)
            with clock("update"):
                learn = cluster.update(batch)
        else:  # every group filtered out (algorithm.filter_zero_variance): nothing to learn from this batch
            log(
                f"step {state.step + 1}: update skipped, {len(kept)} samples left after "
                f"algorithm.filter_zero_variance for {len(cluster.learners)} learner(s); the policy is unchanged"
            )

        # weight sync: the new policy version into every engine (after the rollouts ahead have finished)
        with clock("rollout_wait"):  # the engines load the next version only after them
            for r in ahead:
                r.wait(cluster)
        with clock("sleep"):
            cluster.wake_engines()  # weights back (level 2: the base reloaded) before the new version lands
        with clock("sync"):
            synced = cluster.sync()
        state = RunState(step=state.step + 1, cursor=state.cursor + n_prompts, version=cluster.version)

        # log, evaluate every trainer.eval_every steps, checkpoint every trainer.save_every steps
        row = step_row(state, rollouts, matrix, adv, learn, synced, clock, cluster, cfg, overlapped)
        if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0 and state.step < cfg.trainer.steps:
            row.update({f"eval/{k_}": v for k_, v in evaluate(cluster, cfg, eval_data).items()})
        metrics.log(row)
        if state.step % cfg.trainer.save_every == 0 or state.step == cfg.trainer.steps:
            save_checkpoint(cluster, state, plan, cfg, log=log, ahead=[(r.step, r.collect(cluster)) for r in ahead])

    summary["final"] = evaluate(cluster, cfg, eval_data)
    metrics.track({"step": state.step, **{f"eval/{k_}": v for k_, v in summary["final"].items()}})
    metrics.close()
    summary["steps"] = state.step
    cluster.save_final(str(plan.out / "final"))
    _write_json(summary_path, summary)
    return summary


def step_row(
    state: RunState, rollouts, matrix, adv: StepAdvantages, learn, synced, clock, cluster, cfg, overlapped: bool
) -> dict:
    """One ``metrics.jsonl`` row: rewards, update statistics, tokens, stage times, sync and restarts."""
    k = cfg.rollout.samples_per_prompt
    counts = rollouts.completion_token_counts
    return {
        "step": state.step,
        "policy_version": state.version,
        **matrix.stats(),
        **(learn.row() if learn else {}),
        **{f"tokens/{k_}": v for k_, v in token_stats(counts).items()},
        "truncation_rate": rollouts.finish_reasons.count("length") / len(rollouts),
        "zero_variance_groups": int(adv.flat.all(1).sum()),
        "filtered_groups": int((~adv.keep).sum()) // k,
        "update_skipped": int(learn is None),
        "adv/std": float(adv.values[adv.keep].std()) if int(adv.keep.sum()) > 1 else 0.0,
        "staleness": state.version - 1 - rollouts.policy_version,  # versions between sampler and learner
        **clock.report(rollouts.seconds, overlapped=overlapped),
        "perf/rollout_tokens_per_s": sum(counts) / max(rollouts.seconds, 1e-9),
        "perf/learner_tokens_per_s": (learn.forward_tokens if learn else 0.0)
        / max(clock.times.get("update", 0.0), 1e-9),
        "sync/bytes": synced.num_bytes,
        "sync/publish_s": synced.publish_s,
        "sync/load_s": synced.load_s,
        "sync/file_engines": synced.file_engines,
        "sync/broadcast_engines": synced.collective_engines,
        "sync/MB_per_s": synced.num_bytes / 2**20 / max(clock.times["sync"], 1e-9),
        "restarts/rollout": cluster.restarts["rollout"],
        "restarts/reward": cluster.restarts["reward"],
    }


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))
