"""gdpo on two Ray hosts that share no /dev/shm (tests/helpers/multinode.py): learners on both hosts,
an engine on each, the weight sync across hosts, a replaced engine catching up, a job submitted with
`ray job submit`, and a host lost mid-run. Real Ray, vLLM (CPU) and DeepSpeed (gloo)."""

import json
import subprocess
import time

import pytest
import torch

from gdpo.records import SamplingSettings
from tests.helpers.multinode import RAY, ROOT, TwoHosts, can_unshare

pytestmark = [pytest.mark.e2e, pytest.mark.multinode]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = can_unshare()
    if reason:
        pytest.skip(reason)
    from gdpo.config import load_config
    from gdpo.tasks.tiny_policy import ensure_tiny_policy

    ensure_tiny_policy(load_config(None, [f"sft.cache_dir={ROOT / '.cache' / 'gdpo'}"]).sft)  # shared with the job
    h = TwoHosts(tmp_path_factory.mktemp("hosts"))
    try:
        yield h
    finally:
        h.close()


def _gap(cluster, i, rollouts, batch) -> float:
    """max |engine i's log-prob - learner 0's| over the batch's completion tokens."""
    import ray

    lp = ray.get(cluster.learners[0].policy_logprobs.remote(batch))  # [N, L-1]
    engine = ray.get(cluster.rollouts[i].sequence_logprobs.remote(rollouts.prompt_ids, rollouts.completion_ids))
    return max((torch.tensor(e) - lp[k][batch.loss_mask[k, 1:] > 0]).abs().max().item() for k, e in enumerate(engine))


def _step(cluster, cfg, data, seed):
    from gdpo.records import TrainBatch
    from gdpo.trainer import compute_advantages

    k = cfg.rollout.samples_per_prompt
    rollouts = cluster.generate(data.prompts, k, SamplingSettings(max_new_tokens=48, temperature=1.0), seed=seed)
    matrix = cluster.score(
        rollouts,
        [p for p in data.prompts for _ in range(k)],
        {"answer": [a for a in data.columns["answer"] for _ in range(k)]},
    )
    batch = TrainBatch.from_rollouts(
        rollouts, compute_advantages(matrix.values, matrix.names, cfg).values, cluster.pad_id
    )
    return rollouts, batch, cluster.update(cluster.logprobs(batch))


def test_learners_and_engines_on_two_hosts(hosts):
    import ray

    from actors.cluster import Cluster
    from gdpo.config import load_config
    from gdpo.data import load_prompts
    from gdpo.policy import resolve_model_path

    cfg = load_config(
        None,
        [
            "learner.num_workers=2",
            "rollout.num_workers=2",
            "cluster.placement=separate",
            "cluster.learner_resources={gdpo_learner_slot: 1}",
            "cluster.rollout_resources={gdpo_rollout_slot: 1}",
            "rollout.samples_per_prompt=4",
            "learner.micro_batch_per_worker=4",
            "learner.lr=3e-2",
            "learner.updates_per_step=2",
            "algorithm.kl_coef=0.1",
            "cluster.sync_timeout_s=120",
        ],
    )
    logs = []
    cluster = Cluster(cfg, resolve_model_path(cfg.model.path, cfg.sft, log=lambda m: None), log=logs.append)
    try:
        learner_hosts = ray.get([w.node.remote() for w in cluster.learners])
        assert {node for node, _ in learner_hosts} == {hosts.node_a, hosts.node_b}  # one DeepSpeed rank per host
        assert cluster.rendezvous[0] == learner_hosts[0][1]  # they met on learner 0's host
        home = cluster.weights.learner0_node
        assert sorted(cluster.weights.nodes.values()) == sorted([hosts.node_a, hosts.node_b])
        remote = next(i for i, node in cluster.weights.nodes.items() if node != home)
        local = 1 - remote
        assert cluster.weights.transport == {local: "file", remote: "collective"}

        data = load_prompts(cfg.data, "train", limit=4)
        before = cluster.adapter_checksums()
        rollouts, batch, stats = _step(cluster, cfg, data, seed=1)
        after = cluster.adapter_checksums()
        assert len(set(after)) == 1 and after[0] != before[0]  # both hosts' ranks took the same step
        assert stats.logprob_drift < 1e-3  # before its first update the learner is the policy that sampled
        assert stats.kl > 0  # the second mini-batch sees a policy the first one moved off the reference
        stale = _gap(cluster, remote, rollouts, batch)
        report = cluster.sync()
        assert (report.version, report.file_engines, report.collective_engines) == (1, 1, 1)
        fresh = {i: _gap(cluster, i, rollouts, batch) for i in (local, remote)}
        print(f"engine on the other host: |engine - learner| {stale:.3g} before the sync, {fresh[remote]:.2g} after")
        assert stale > 1e-2, stale  # the check can fail: before the sync the remote engine disagrees
        assert fresh[local] < 1e-3 and fresh[remote] < 1e-3, fresh

        # the engine on the other host dies: its replacement catches up over the broadcast before sampling
        ray.kill(cluster.rollouts[remote])
        again = cluster.generate(data.prompts[:2], 2, SamplingSettings(max_new_tokens=8, temperature=1.0), seed=2)
        assert cluster.restarts["rollout"] == 1 and again.policy_version == 1
        assert cluster.weights.nodes[remote] != home and cluster.weights.transport[remote] == "collective"
        assert _gap(cluster, remote, rollouts, batch) < 1e-3
        assert any("restarted on node" in line for line in logs), logs

        # the next version reaches both engines through a group rebuilt after the catch-up
        rollouts, batch, _ = _step(cluster, cfg, data, seed=3)
        assert cluster.sync().version == 2 and cluster.weights.epoch >= 3
        assert max(_gap(cluster, i, rollouts, batch) for i in (local, remote)) < 1e-3
    finally:
        cluster.shutdown()


def test_a_submitted_job_survives_losing_a_host(hosts, tmp_path):
    """`ray job submit` of `python -m gdpo.train` with the default config (no cluster.address): the job
    runs on the two hosts (one engine each); host B is lost after step 1, its engine is restarted on
    host A, catches up there, and the run completes."""
    out = tmp_path / "job_run"
    args = [
        "job",
        "submit",
        "--address",
        hosts.dashboard,
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "gdpo.train",
        f"sft.cache_dir={ROOT / '.cache' / 'gdpo'}",
        f"trainer.output_dir={out}",
        "trainer.steps=3",
        "trainer.save_every=3",
        "trainer.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=64",
        "data.eval_size=8",
        "trainer.eval_every=0",
        "rollout.num_workers=2",
        "cluster.placement=separate",
        "cluster.learner_resources={gdpo_learner_host: 1}",
        "cluster.rollout_resources={gdpo_rollout_slot: 1}",
        "cluster.sync_timeout_s=120",
    ]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after `ray start` returns
        job = subprocess.Popen(
            [RAY, *args], env=hosts.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        metrics = out / "metrics.jsonl"
        while job.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.5)
        if job.poll() is None or time.time() > deadline:
            break
        output = job.stdout.read()
        if "No available agent" not in output:
            pytest.fail(f"the job ended before its first step:\n{output[-4000:]}")
        time.sleep(3)
    first = json.loads(metrics.read_text().splitlines()[0])
    assert (first["sync/file_engines"], first["sync/broadcast_engines"]) == (1, 1)  # one engine on each host

    hosts.lose_b()
    hosts.release_a_slot()  # room on host A for the engine that was on B
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # nothing lost
    assert rows[-1]["restarts/rollout"] >= 1
    assert (rows[-1]["sync/file_engines"], rows[-1]["sync/broadcast_engines"]) == (2, 0)  # both engines on A now
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary["final"]
