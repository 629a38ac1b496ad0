import pytest

ray = pytest.importorskip("ray")


@pytest.mark.e2e
def test_accuracy_inside_a_ray_actor():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:

        @ray.remote
        class Scorer:
            def score(self, completions, answers):
                from rewards import BoundReward

                return BoundReward.from_name("accuracy").score(
                    ["p"] * len(completions), completions, {"answer": answers}
                )

        scorer = Scorer.remote()
        assert ray.get(scorer.score.remote(["\\boxed{7}", "#### 8", "9"], ["7", "7", "9"]), timeout=180) == [
            1.0,
            0.0,
            1.0,
        ]
    finally:
        ray.shutdown()
