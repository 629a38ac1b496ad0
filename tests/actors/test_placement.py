"""The GPU decision, the bundles and every actor's GPU request, for real against a Ray cluster whose (CPU)
node advertises 4 GPUs (``num_gpus=4``): Ray schedules against them and sets ``CUDA_VISIBLE_DEVICES`` for
each actor, as it would on a GPU node."""

import os

import pytest

from actors import placement
from gdpo.config import ConfigError, load_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _probe_class(ray):
    @ray.remote
    class Probe:
        def visible(self) -> tuple[list, str]:
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

    return Probe


def _place(ray, plan: placement.Placement) -> tuple[list, list]:
    """Start a probe with each learner's and each engine's options in its bundle; their visible GPUs."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(plan.bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    probe = _probe_class(ray)

    def start(opts, bundle):
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)
        return probe.options(**opts, scheduling_strategy=strategy).remote()

    learners = [start(plan.learner_options(i), b) for i, b in enumerate(plan.learner_bundle)]
    engines = [start(plan.rollout_options(i), b) for i, b in enumerate(plan.rollout_bundle)]
    try:
        return ray.get([a.visible.remote() for a in learners]), ray.get([a.visible.remote() for a in engines])
    finally:
        for a in learners + engines:
            ray.kill(a)
        remove_placement_group(pg)


def test_the_gpu_decision_is_the_clusters_not_the_drivers(gpu_ray):
    import torch

    assert not torch.cuda.is_available()  # this driver has no GPU ...
    assert placement.cluster_has_gpus()  # ... its cluster has


def test_colocated_each_learner_shares_one_gpu_with_one_engine(gpu_ray):
    cfg = load_config(None, ["learner.num_workers=2", "rollout.num_workers=2"])
    plan = placement.plan(cfg, placement.cluster_has_gpus())
    assert plan.use_gpu and plan.bundles == [{"GPU": 1, "CPU": 1}] * 2
    learners, engines = _place(gpu_ray, plan)
    for (lgpu, lenv), (egpu, eenv) in zip(learners, engines):
        assert len(lgpu) == 1 and lgpu == egpu and lenv == eenv == str(lgpu[0])  # one GPU each, the pair's
    assert learners[0][0] != learners[1][0]  # and not the other pair's
    assert plan.shares_learner0_device(0) and not plan.shares_learner0_device(1)


def test_separate_engines_with_tensor_parallelism_get_whole_gpus_of_their_own(gpu_ray):
    cfg = load_config(
        None,
        [
            "cluster.placement=separate",
            "learner.num_workers=2",
            "rollout.num_workers=1",
            "rollout.tensor_parallel_size=2",
        ],
    )
    plan = placement.plan(cfg, True)
    assert plan.bundles == [{"GPU": 1, "CPU": 1}] * 2 + [{"GPU": 2, "CPU": 1}]
    learners, engines = _place(gpu_ray, plan)
    ((egpus, eenv),) = engines
    assert len(egpus) == 2 and len(eenv.split(",")) == 2  # vLLM's world of 2 sees its 2 GPUs
    seen = [g for gpus, _ in learners for g in gpus] + list(egpus)
    assert len(seen) == len(set(seen)) == 4  # nobody shares a GPU
    assert not plan.shares_learner0_device(0)


def test_colocated_tensor_parallelism_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size.*placement=separate"):
        load_config(None, ["rollout.tensor_parallel_size=2"])
    cfg = load_config(None, ["rollout.tensor_parallel_size=2", "cluster.placement=separate"])
    assert placement.plan(cfg, False).tp == 1  # on CPUs the key does nothing


def test_on_a_cpu_cluster_no_actor_asks_for_a_gpu():
    plan = placement.plan(load_config(), False)
    assert plan.bundles == [{"CPU": 1}] and "num_gpus" not in plan.learner_options(0)
    assert "num_gpus" not in plan.rollout_options(0)


@pytest.mark.parametrize(
    "placement_name, gpus, order",
    [
        ("colocated", True, ["learners started", "engine 0", "engine 1"]),  # shared GPUs: one after the other
        ("separate", True, ["engine 0", "engine 1", "learners started"]),
        ("colocated", False, ["engine 0", "engine 1", "learners started"]),  # CPUs: vLLM profiles no GPU
    ],
)
def test_engines_on_the_learners_gpus_start_after_the_learners(placement_name, gpus, order):
    from actors.cluster import Cluster

    events = []
    cluster = object.__new__(Cluster)  # the start-up order alone: no actors
    cluster.cfg = load_config(
        None, [f"cluster.placement={placement_name}", "rollout.num_workers=2", "learner.num_workers=2"]
    )
    cluster.placement = placement.plan(cluster.cfg, gpus)
    cluster._spawn_rollout = lambda i: events.append(f"engine {i}")
    cluster._learner_call = lambda refs, what: events.append("learners started") or ["manifest"]
    assert cluster._start_engines(["ref"]) == "manifest"
    assert events == order
