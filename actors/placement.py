"""Where the run's actors go: whether it uses GPUs, its placement-group bundles and each actor's request.

The GPU decision is the cluster's, not the driver's: under ``ray job submit`` the driver runs on the head
node, which often has no GPU while the workers' nodes do. Every learner and engine then asks Ray for its
GPU share, so Ray sets ``CUDA_VISIBLE_DEVICES`` for it; since Ray 2.60 an actor that asks for no GPU is
no longer hidden from the node's GPUs, and engines that all saw every GPU would all start on cuda:0.

Bundles (``unit`` = one GPU and one CPU on a GPU cluster, one CPU otherwise):

- colocated: bundle i holds learner i and the engine of rollout worker i, each with half of it;
- separate: one bundle per learner, then one per engine, each actor with the whole bundle; an engine with
  ``rollout.tensor_parallel_size`` = t gets one bundle of t GPUs and runs its t vLLM workers as its own
  processes on them (vLLM's ``mp`` executor: its Ray executor would look for GPUs in the bundle the engine
  already holds).

Colocated engines with t > 1 are refused when the config is loaded: an engine's t GPUs are one bundle, and
the learners sharing them would get GPU fractions Ray may pack onto one device.
"""

from __future__ import annotations

from dataclasses import dataclass

from gdpo.config import Config


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process joined has GPU resources (on any node)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class Placement:
    use_gpu: bool
    tp: int  # GPUs per engine (rollout.tensor_parallel_size on GPUs, 1 on CPUs)
    colocated: bool
    bundles: list[dict]  # the placement group's bundles
    learner_bundle: list[int]  # [learners] bundle index of each learner
    rollout_bundle: list[int]  # [rollout workers] bundle index of each engine

    def learner_options(self, i: int) -> dict:
        """Ray options of learner i (its share of its bundle), without the scheduling strategy."""
        share = 0.5 if self.colocated else 1.0
        return {"num_cpus": share * 0.5, **({"num_gpus": share} if self.use_gpu else {})}

    def rollout_options(self, i: int) -> dict:
        """Ray options of rollout worker i: half a GPU beside its learner, else its bundle's ``tp`` GPUs."""
        share = 0.5 if self.colocated else 1.0
        gpus = share if self.colocated else float(self.tp)
        return {"num_cpus": share * 0.5, **({"num_gpus": gpus} if self.use_gpu else {})}

    def shares_learner0_device(self, i: int) -> bool:
        """Whether rollout i's engine runs on learner 0's GPU (NCCL cannot put both in one group)."""
        return self.use_gpu and self.colocated and self.rollout_bundle[i] == self.learner_bundle[0]


def plan(cfg: Config, use_gpu: bool) -> Placement:
    """The run's bundles and requests; ``cluster.learner_resources`` / ``rollout_resources`` are added to
    the role's bundles."""
    learners, engines = cfg.learner.num_workers, cfg.rollout.num_workers
    tp = cfg.rollout.tensor_parallel_size if use_gpu else 1
    colocated = cfg.cluster.placement == "colocated"
    lres, rres = dict(cfg.cluster.learner_resources), dict(cfg.cluster.rollout_resources)
    unit = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    if colocated:  # tensor_parallel_size > 1 was refused by the config's validation
        n = max(learners, engines)
        bundles = [{**unit, **(lres if i < learners else {}), **(rres if i < engines else {})} for i in range(n)]
        return Placement(use_gpu, tp, True, bundles, list(range(learners)), list(range(engines)))
    engine_unit = {"GPU": tp, "CPU": 1} if use_gpu else unit
    bundles = [{**unit, **lres} for _ in range(learners)] + [{**engine_unit, **rres} for _ in range(engines)]
    return Placement(use_gpu, tp, False, bundles, list(range(learners)), [learners + i for i in range(engines)])
