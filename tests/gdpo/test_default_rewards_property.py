"""Under the default config's rewards and estimator, no correct answer gets a lower advantage than a
wrong answer of its own group, whatever the lengths (the hazard of conditioned group-relative length
columns under GDPO: a lone correct-but-longest answer at 0, a long correct one below the wrong ones)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdpo.config import load_config
from gdpo.trainer import compute_advantages
from rewards import BoundReward, score_rewards

K = 4  # samples per prompt here (the default config's 8 would only make the search slower)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(st.tuples(st.booleans(), st.integers(min_value=18, max_value=128)), min_size=K, max_size=K),
        min_size=1,
        max_size=4,
    )
)
def test_no_correct_answer_ranks_below_a_wrong_one_in_its_group(groups):
    cfg = load_config(None, [f"rollout.samples_per_prompt={K}"])
    rewards = [BoundReward.from_name(name, kwargs) for name, kwargs in cfg.rewards.specs()]
    samples = [s for g in groups for s in g]
    completions = [f"\\boxed{{{5 if ok else 6}}}" for ok, _ in samples]
    n = len(samples)
    matrix = score_rewards(
        rewards,
        ["Compute 2+3\n"] * n,
        completions,
        [t for _, t in samples],
        [i // K for i in range(n)],
        {
            "answer": ["5"] * n,
            "question": ["Compute 2+3"] * n,
            "shortest_solution": ["2+3=5\n\\boxed{5}"] * n,
            "floor_tokens": [12] * n,
        },
    )
    adv = compute_advantages(matrix.values, matrix.names, cfg).values
    for g in range(len(groups)):
        correct = [adv[g * K + i].item() for i, (ok, _) in enumerate(groups[g]) if ok]
        wrong = [adv[g * K + i].item() for i, (ok, _) in enumerate(groups[g]) if not ok]
        if correct and wrong:
            assert min(correct) >= max(wrong) - 1e-6, (groups[g], correct, wrong)
