"""The real driver loop (``gdpo.trainer._run``: checkpoints, resume, metrics, summary) over an in-process
stand-in for the Ray cluster, for crash-injection tests of the run directory. The stand-in's "policy"
is one number that every update changes by an amount that depends on the step's rollouts, and its
"optimizer" a second one: a resume that loads the wrong checkpoint, redoes a step with other prompts
or seeds, or loses the optimizer state ends on another value than a straight run.

``python -m tests.helpers.fake_run OUT STEPS [CRASH]`` runs it in a fresh process; CRASH names the
point where the process dies with ``os._exit(137)`` (no cleanup, as a SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch

from gdpo.data import PromptSet
from gdpo.preflight import RunInputs
from gdpo.records import RolloutBatch, SyncReport, UpdateStats, UpdateSums
from rewards import RewardMatrix


def _hash(*parts) -> int:  # the same in every process (``hash`` of a str is salted per process)
    return zlib.crc32(repr(parts).encode())


class FakeCluster:
    def __init__(self, reward_names: list[str]):
        self.names = reward_names  # "accuracy" scores the sample's correctness, every other one its length
        self.learners, self.pad_id, self.version = [0], 0, 0
        self.restarts = {"rollout": 0, "reward": 0}
        self.policy, self.moment = 0.0, 0.0

    # rollouts: sample i of a prompt is correct when a hash of (prompt, seed, i) falls under the policy
    def submit_generate(self, prompts, k, sampling, seed):
        return prompts, k, seed

    def collect(self, pending) -> RolloutBatch:
        prompts, k, seed = pending
        rows = [(p, i) for p in prompts for i in range(k)]
        good = [(_hash(p, seed, i) % 1000) / 1000 < 0.3 + (0.1 * abs(self.policy)) % 0.6 for p, i in rows]
        lengths = [3 + _hash(p, seed, i, "n") % 5 for p, i in rows]
        return RolloutBatch(
            prompt_ids=[[1, 2]] * len(rows),
            completion_ids=[[5] * n for n in lengths],
            completions=["ok" if g else "no" for g in good],
            finish_reasons=["stop"] * len(rows),
            sampling_logprobs=[[0.0] * n for n in lengths],
            group_ids=[j // k for j in range(len(rows))],
            policy_version=self.version,
        )

    def generate(self, prompts, k, sampling, seed):
        return self.collect(self.submit_generate(prompts, k, sampling, seed))

    def wait(self, pending):
        pass

    def score(self, batch, prompts, columns) -> RewardMatrix:
        return RewardMatrix(
            names=self.names,
            values=torch.tensor(
                [
                    [(1.0 if c == "ok" else 0.0) if n == "accuracy" else -len(ids) / 10 for n in self.names]
                    for c, ids in zip(batch.completions, batch.completion_ids)
                ]
            ),
        )

    def sleep_engines(self):
        pass

    def wake_engines(self):
        pass

    def logprobs(self, batch):
        return batch

    def update(self, batch) -> UpdateStats:
        signal = float((batch.advantages * torch.arange(1, len(batch) + 1)).sum())
        self.moment = 0.5 * self.moment + signal
        self.policy += 0.01 * self.moment + 0.001
        sums = UpdateSums(loss=signal, tokens=1.0, forward_tokens=float(batch.loss_mask.sum()), grad_norm=abs(signal))
        return UpdateStats.from_sums([sums])

    def sync(self) -> SyncReport:
        self.version += 1
        return SyncReport(self.version, 0, 0.0, 0.0, 1, 0)

    def save(self, directory):
        (Path(directory) / "deepspeed").mkdir(parents=True)
        (Path(directory) / "deepspeed" / "state.json").write_text(json.dumps([self.policy, self.moment]))

    def load(self, directory):
        self.policy, self.moment = json.loads((Path(directory) / "deepspeed" / "state.json").read_text())

    def resume(self, directory, version):
        self.load(directory)
        self.version = version - 1
        return self.sync()

    def save_final(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "policy.json").write_text(json.dumps(self.policy))


def inputs() -> RunInputs:
    train = PromptSet([f"train {i}" for i in range(10)], {"answer": [str(i) for i in range(10)]})
    held_out = PromptSet([f"eval {i}" for i in range(6)], {"answer": [str(i) for i in range(6)]})
    return RunInputs(model_path="fake", train=train, eval=held_out, context=64, longest_prompt=2)


def config(out: str, steps: int, *extra: str):
    from gdpo.config import load_config

    return load_config(
        None,
        [
            f"trainer.output_dir={out}",
            f"trainer.steps={steps}",
            "trainer.prompts_per_step=3",
            "rollout.samples_per_prompt=4",
            "trainer.save_every=2",
            "trainer.eval_every=3",
            *extra,
        ],
    )


def run(out: str, steps: int, *extra: str, log=lambda msg: None) -> dict:
    """open_run + the real ``_run`` on a FakeCluster (what ``gdpo.trainer.train`` does without Ray)."""
    from gdpo import trainer
    from gdpo.checkpoints import open_run

    cfg = config(out, steps, *extra)
    plan = open_run(cfg, log)
    if plan.finished:
        return plan.summary
    return trainer._run(FakeCluster([r.name for r in cfg.rewards.functions]), cfg, inputs(), plan, log)


def die():
    sys.stdout.flush()
    os._exit(137)


def arm_crash(point: str) -> None:
    """Make the process die at ``point``: NAME or NAME@STEP."""
    from gdpo import checkpoints, metrics, trainer

    name, _, at = point.partition("@")
    at = int(at or 0)
    if name == "after_baseline":  # summary.json has the baseline; no step has run

        def init(self, *a, **k):
            die()

        metrics.MetricsLogger.__init__ = init
    elif name in ("after_row", "torn_row"):  # a step's metrics row written (whole or cut short), not saved
        original_log = metrics.MetricsLogger.log

        def log(self, row):
            if row["step"] == at:
                if name == "torn_row":
                    self.file.write(json.dumps(row)[:40])
                    self.file.flush()
                    die()
                original_log(self, row)
                die()
            original_log(self, row)

        metrics.MetricsLogger.log = log
    elif name == "before_manifest":  # the learners' and driver's files written, no manifest, no rename
        original_manifest = checkpoints.write_manifest

        def write_manifest(directory):
            if f"step-{at:06d}" in directory.name:
                die()
            original_manifest(directory)

        checkpoints.write_manifest = write_manifest
    elif name == "after_commit":  # the checkpoint renamed into place, older ones not yet pruned
        original_prune = trainer.prune_checkpoints

        def prune(out, run_id, keep, log=print):
            state = sorted((out / "checkpoints").glob("step-*"))[-1]
            if state.name == f"step-{at:06d}":
                die()
            original_prune(out, run_id, keep, log)

        trainer.prune_checkpoints = prune
    elif name == "in_final":  # the final evaluation done, the final policy not written
        FakeCluster.save_final = lambda self, directory: die()
    else:
        raise ValueError(f"unknown crash point {point!r}")


if __name__ == "__main__":
    out_dir, n_steps = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        arm_crash(sys.argv[3])
    print(json.dumps(run(out_dir, n_steps)))
