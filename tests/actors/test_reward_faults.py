"""Reward workers that hang or keep dying, under real Ray: the driver's scoring (``Cluster.score``, its
deadlines, replacement and restart cap) over real ``RewardWorker`` actors. The learners and engines a
full Cluster would start are not needed for scoring and are not started."""

import time

import pytest
import ray

from actors.cluster import Cluster, WorkerFailed
from gdpo.config import load_config
from gdpo.records import RolloutBatch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _scoring_cluster(*overrides: str) -> Cluster:
    """A Cluster with only its reward workers (what ``Cluster.score`` uses), made by its own code."""
    cfg = load_config(None, ["rewards.num_workers=2", *overrides])
    cluster = object.__new__(Cluster)
    cluster.cfg, cluster.log, cluster.logs = cfg, None, []
    cluster.log = cluster.logs.append
    cluster.restarts = {"rollout": 0, "reward": 0}
    cluster.reward_workers = [cluster._new_reward(i) for i in range(cfg.rewards.num_workers)]
    return cluster


def _batch(n_groups: int = 4, k: int = 2) -> tuple[RolloutBatch, list[str], dict]:
    n = n_groups * k
    batch = RolloutBatch(
        prompt_ids=[[1]] * n,
        completion_ids=[[2, 3]] * n,
        completions=["\\boxed{4}"] * n,
        finish_reasons=["stop"] * n,
        sampling_logprobs=[[0.0, 0.0]] * n,
        group_ids=[i // k for i in range(n)],
        policy_version=0,
    )
    return batch, ["2+2?"] * n, {"answer": ["4"] * n}


def test_a_hung_plugin_is_killed_replaced_and_named(local_ray):
    cluster = _scoring_cluster(
        "rewards.functions=[{name: accuracy}, {name: 'tests.helpers.plugins:hangs'}]",
        "rewards.num_workers=1",
        "rewards.timeout_s=1",
        "cluster.max_restarts=10",
    )
    batch, prompts, columns = _batch()
    first = list(cluster.reward_workers)
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"reward 'tests.helpers.plugins:hangs' did not return within 1 s"):
        cluster.score(batch, prompts, columns)
    assert time.monotonic() - t0 < 60
    assert cluster.restarts["reward"] == 2  # tried 3 times, replaced twice
    assert all(w not in first for w in cluster.reward_workers)
    for old in first:  # the hung worker was killed, not left running beside its replacement
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(old.pid.remote(), timeout=30)


def test_a_worker_that_keeps_dying_stops_at_the_restart_cap(local_ray):
    cluster = _scoring_cluster(
        "rewards.functions=[{name: 'tests.helpers.plugins:die_always'}]",
        "rewards.correctness=tests.helpers.plugins:die_always",  # the only reward
        "rewards.num_workers=1",
        "cluster.max_restarts=1",
    )
    batch, prompts, columns = _batch()
    with pytest.raises(
        WorkerFailed,
        match=r"reward worker 0 died .*restarted 1 times already "
        r"\(cluster.max_restarts=1\).*raise cluster.max_restarts",
    ):
        cluster.score(batch, prompts, columns)
    assert cluster.restarts["reward"] == 1
    assert any("restarting it in 1 s (restart 1 of at most 1)" in m for m in cluster.logs), cluster.logs


def test_scoring_works_after_a_replacement(local_ray):
    cluster = _scoring_cluster("rewards.functions=[{name: accuracy}]")
    batch, prompts, columns = _batch()
    ray.kill(cluster.reward_workers[1], no_restart=True)
    matrix = cluster.score(batch, prompts, columns)
    assert matrix.values[:, 0].tolist() == [1.0] * len(batch)
    assert cluster.restarts["reward"] == 1
