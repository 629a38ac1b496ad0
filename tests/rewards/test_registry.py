import time
from pathlib import Path

import pytest

from rewards import (
    BoundReward,
    RewardError,
    RewardTimeout,
    register_reward,
    registered_rewards,
    resolve_reward,
    score_rewards,
)
from tests.helpers import plugins


def test_builtins_are_registered():
    for name in [
        "accuracy",
        "format",
        "length_budget",
        "kimi_length",
        "cosine_length",
        "dapo_overlong",
        "l1_exact",
        "l1_max",
        "efficient_sigmoid",
    ]:
        assert name in registered_rewards()


def test_duplicate_name_is_an_error():
    @register_reward("test_dup_once")
    def a(prompts, completions, **_):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="'test_dup_once' is already registered"):

        @register_reward("test_dup_once")
        def b(prompts, completions, **_):
            return [0.0] * len(completions)


def test_module_function_plugin():
    fn = resolve_reward("tests.helpers.plugins:half")
    assert fn(["p"], ["c"]) == [0.5]


def test_file_plugin(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def brevity(prompts, completions, completion_token_counts, **_):\n"
        "    return [1.0 / (1 + n) for n in completion_token_counts]\n"
    )
    r = BoundReward.from_name(f"{f}:brevity")
    assert r.score(["p", "p"], ["a", "b"], {"completion_token_counts": [0, 3]}) == [1.0, 0.25]


def test_entry_point_plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "ep_plugin_pkg.py"
    pkg.write_text("def shout(prompts, completions, **_):\n    return [float(c.isupper()) for c in completions]\n")
    dist = tmp_path / "ep_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gdpo.rewards]\nshout = ep_plugin_pkg:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("shout")(["p", "p"], ["HI", "hi"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_reward", r"unknown reward 'no_such_reward' \(registered: accuracy"),
        ("tests.helpers.nope:fn", r"cannot import module 'tests.helpers.nope'"),
        ("tests.helpers.plugins:missing", r"has no function 'missing'"),
        ("/no/such/file.py:fn", r"file not found"),
    ],
)
def test_unresolvable_plugins(name, message):
    with pytest.raises(RewardError, match=message):
        resolve_reward(name)


def test_plugin_that_raises_names_reward_plugin_and_sample():
    r = BoundReward.from_name("tests.helpers.plugins:raises_on_bad")
    with pytest.raises(
        RewardError,
        match=r"reward 'tests.helpers.plugins:raises_on_bad' \(tests.helpers.plugins.raises_on_bad\) "
        r"raised on sample 2: ZeroDivisionError",
    ):
        r.score(["p"] * 3, ["ok", "fine", "bad"], {})


def test_wrong_length_and_non_numbers_are_errors():
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        BoundReward.from_name("tests.helpers.plugins:wrong_length").score(["p", "p"], ["a", "b"], {})
    with pytest.raises(RewardError, match=r"returned 'high' for sample 0"):
        BoundReward.from_name("tests.helpers.plugins:not_a_number").score(["p"], ["a"], {})


def test_missing_field_is_named():
    r = BoundReward.from_name("tests.helpers.plugins:needs_difficulty")
    with pytest.raises(RewardError, match="needs the field 'difficulty'"):
        r.score(["p"], ["a"], {"answer": ["1"]})
    assert r.score(["p"], ["a"], {"difficulty": [3]}) == [3.0]


def test_unknown_kwarg_is_an_error():
    with pytest.raises(RewardError, match="has no parameter 'budget'"):
        BoundReward.from_name("format", {"budget": 3})


def test_none_and_nan_become_nan_in_the_matrix():
    @register_reward("test_sometimes_none")
    def sometimes(prompts, completions, **_):
        return [None, float("nan"), 2]

    m = score_rewards(
        [BoundReward.from_name("test_sometimes_none")], ["p"] * 3, ["a", "b", "c"], [1, 2, 3], [0, 0, 0], {}
    )
    assert m.values.shape == (3, 1)
    assert m.values[:2].isnan().all() and m.values[2, 0] == 2.0
    assert m.stats()["reward/test_sometimes_none/unscored"] == 2.0


def test_matrix_checks_column_lengths():
    with pytest.raises(RewardError, match="data column 'answer' has 1 values for 2 samples"):
        score_rewards([BoundReward.from_name("format")], ["p", "p"], ["a", "b"], [1, 1], [0, 0], {"answer": ["1"]})


# ----------------------------------------------------------------------------- faults (issue 18)


def test_a_hung_plugin_is_stopped_by_its_timeout_and_named():
    bound = BoundReward.from_name("tests.helpers.plugins:hangs")
    t0 = time.monotonic()
    with pytest.raises(RewardTimeout, match=r"reward 'tests.helpers.plugins:hangs' did not return within 0.5 s"):
        bound.score(["p"] * 3, ["a", "b", "c"], {}, timeout_s=0.5)
    assert time.monotonic() - t0 < 5


def test_a_timeout_keeps_an_outer_alarm():
    import signal

    fired = []
    signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        BoundReward.from_name("tests.helpers.plugins:half").score(["p"], ["a"], {}, timeout_s=1.0)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 1.0 < remaining <= 3.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


@pytest.mark.parametrize("plugin", ["numpy_inf", "huge_int"])
def test_infinite_outputs_of_any_number_type_are_errors(plugin):
    bound = BoundReward.from_name(f"tests.helpers.plugins:{plugin}")
    with pytest.raises(RewardError, match=r"for sample \d+; expected a finite number"):
        bound.score(["p"] * 3, ["a", "x", "b"], {})


def test_the_failing_sample_is_found_in_few_calls():
    plugins.CALLS.clear()
    completions = ["ok"] * 37 + ["bad"] + ["ok"] * 26
    bound = BoundReward.from_name("tests.helpers.plugins:counts_calls_and_raises_on_bad")
    with pytest.raises(RewardError, match="raised on sample 37"):
        bound.score(["p"] * 64, completions, {})
    assert len(plugins.CALLS) <= 1 + 2 * 6 + 1  # the batch, then halving: not one call per sample


def test_a_slow_failure_is_not_called_again_per_sample():
    plugins.CALLS.clear()
    bound = BoundReward.from_name("tests.helpers.plugins:slow_then_raises")
    with pytest.raises(RewardError, match="raised on a batch of 8 samples: TimeoutError"):
        bound.score(["p"] * 8, ["a"] * 8, {})
    assert plugins.CALLS == [8]


@pytest.mark.parametrize("module", ["exits_at_import", "divides_at_import"])
def test_a_plugin_failing_at_import_is_a_named_error(module):
    path = Path(__file__).resolve().parents[1] / "helpers" / "bad_plugins" / f"{module}.py"
    with pytest.raises(RewardError, match=rf"reward plugin '.*{module}.py:reward': loading .* failed"):
        resolve_reward(f"{path}:reward")
    with pytest.raises(RewardError, match=rf"importing module 'tests.helpers.bad_plugins.{module}' failed"):
        resolve_reward(f"tests.helpers.bad_plugins.{module}:reward")


@pytest.mark.parametrize("name", ["os:system", "builtins:len", "math:sqrt"])
def test_a_callable_that_is_not_a_reward_is_refused(name):
    with pytest.raises(RewardError, match="a reward is fn\\(prompts, completions, \\*\\*fields\\)"):
        BoundReward.from_name(name)
