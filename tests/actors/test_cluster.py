"""The actor cluster on the real stack: two data-parallel DeepSpeed learners, separate placement."""
import pytest

pytestmark = pytest.mark.e2e


def test_two_learners_stay_identical_and_sync_reaches_the_engine():
    import ray

    from actors.cluster import Cluster, ray_init
    from gdpo.config import load_config
    from gdpo.data import load_prompts
    from gdpo.policy import resolve_model_path
    from gdpo.records import TrainBatch
    from gdpo.trainer import compute_advantages

    cfg = load_config(None, ["learner.num_workers=2", "cluster.placement=separate", "cluster.num_cpus=4",
                             "rollout.samples_per_prompt=4", "learner.micro_batch_per_worker=4", "learner.lr=1e-2",
                             "learner.updates_per_step=2", "algorithm.kl_coef=0.1"])
    ray_init(cfg)
    cluster = Cluster(cfg, resolve_model_path(cfg, log=lambda m: None), log=lambda m: None)
    try:
        data = load_prompts(cfg.data, "train", limit=4)
        rollouts = cluster.generate(data.prompts, 4, {"max_new_tokens": 96, "temperature": 1.0, "top_p": 1.0}, seed=1)
        prompts = [p for p in data.prompts for _ in range(4)]
        matrix = cluster.score(rollouts, prompts, {"answer": [a for a in data.columns["answer"] for _ in range(4)]})
        assert matrix.values.shape == (16, 2)
        adv, _ = compute_advantages(matrix.values, cfg)
        before = cluster.adapter_checksums()
        stats = cluster.update(cluster.logprobs(TrainBatch.from_rollouts(rollouts, adv, cluster.pad_id)))
        after = cluster.adapter_checksums()
        assert len(set(before)) == 1 and len(set(after)) == 1  # ranks hold identical adapters
        assert before[0] != after[0]  # and the step changed them
        assert stats["logprob_drift"] < 1e-3
        assert stats["kl"] > 0  # the second mini-batch sees a policy the first one moved off the reference
        msg = cluster.sync()
        assert msg.version == cluster.version == 1 and msg.num_bytes > 0
        again = cluster.generate(data.prompts[:1], 2, {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}, seed=2)
        assert again.policy_version == 1
    finally:
        cluster.shutdown()
        ray.shutdown()
