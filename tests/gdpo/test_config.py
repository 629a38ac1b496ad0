import dataclasses
import re
from pathlib import Path

import pytest

from gdpo.config import DEFAULT_CONFIG, Config, ConfigError, config_reference, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_is_the_embedded_preset_and_validates():
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "tiny_cpu.yaml"
    assert cfg.algorithm.estimator == "gdpo"
    assert [r.name for r in cfg.rewards.functions] == ["accuracy", "efficient_sigmoid"]
    assert cfg.rewards.functions[1].condition_on is None  # correct-only by itself: a condition is refused
    assert cfg.model.path == "builtin:tiny-chain-arith"


def test_every_preset_in_configs_validates():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        if preset.name.startswith(("ofq", "compress")):
            continue
        load_config(preset)


def test_dotted_overrides_with_types_and_list_indices():
    cfg = load_config(
        None,
        [
            "trainer.prompts_per_step=8",
            "algorithm.estimator=grpo",
            "rollout.top_p=0.9",
            "rewards.functions.1.kwargs={alpha: 0.4}",
            "learner.target_modules=[q_proj,v_proj]",
            "cluster.address=null",
            "learner.lr=2e-3",
        ],
    )
    assert cfg.learner.lr == 2e-3
    assert cfg.trainer.prompts_per_step == 8
    assert cfg.algorithm.estimator == "grpo"
    assert cfg.rollout.top_p == 0.9
    assert cfg.rewards.functions[1].kwargs == {"alpha": 0.4}
    assert cfg.learner.target_modules == ("q_proj", "v_proj")
    assert cfg.cluster.address is None


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.steps = 3


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.prompts_per_stp=8",
            r"unknown config key 'trainer.prompts_per_stp'.*did you mean 'trainer.prompts_per_step'",
        ),
        ("trainer.prompts_per_step=eight", r"'trainer.prompts_per_step' must be an integer, got 'eight'"),
        ("trainer.prompts_per_step=2.5", r"'trainer.prompts_per_step' must be an integer"),
        ("algorithm.estimator=ppo", r"'algorithm.estimator' = 'ppo' is not allowed \(allowed: 'gdpo', 'grpo'\)"),
        ("rollout.samples_per_prompt=1", r"'rollout.samples_per_prompt'.*'gdpo' estimator.*needs >= 2"),
        ("rewards.functions.0.name=nope", r"'rewards.functions.0.name': unknown reward 'nope' \(registered: accuracy,"),
        (
            "rewards.functions.1.condition_on=format",
            r"'rewards.functions.1.condition_on': must name a reward listed before",
        ),
        ("learner.zero_stage=1", r"'learner.zero_stage' = 1 is not allowed \(allowed: 2, 3\)"),
        ("sft.num_heads=4", r"'sft.num_heads': head_dim = 32 < 64"),
        ("learner.dora_dropout=1.5", r"'learner.dora_dropout': must be in \[0, 1\)"),
        ("trainer.steps=0", r"'trainer.steps': must be >= 1"),
        ("rollout.top_p=1.5", r"'rollout.top_p': must be in \(0, 1\]"),
        ("learner.lr=.nan", r"'learner.lr' must be finite"),
        ("model.trust_remote_code=yes please", r"'model.trust_remote_code' must be true or false"),
        ("rewards.functions.5.weight=1", r"'rewards.functions.5': index '5' is out of range 0..1"),
        ("noequals", r"not of the form key=value"),
        (
            "trainer.rollout_ahead=1",
            r"'trainer.rollout_ahead' \(in the overrides\) was replaced by trainer.max_staleness",
        ),
        ("algorithm.rollout_correction=is", r"'algorithm.rollout_correction' = 'is' is not allowed \(allowed: 'none'"),
        ("algorithm.rollout_correction_cap=1", r"'algorithm.rollout_correction_cap': must be > 1"),
        (
            "algorithm.policy_loss=grpo",
            r"'algorithm.policy_loss' = 'grpo' is not allowed \(allowed: 'ppo_clip', 'gspo'",
        ),
        (
            "algorithm.filter_zero_variance=[length]",
            r"'algorithm.filter_zero_variance': 'length' is not a configured reward",
        ),
    ],
)
def test_bad_input_names_the_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(lst)
    dup = tmp_path / "dup.yaml"
    dup.write_text("rewards:\n  functions:\n    - name: accuracy\n    - name: accuracy\n")
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(dup)
    old_key = tmp_path / "old.yaml"
    old_key.write_text("trainer:\n  rollout_ahead: 1\n")
    with pytest.raises(ConfigError, match=r"'trainer.rollout_ahead' \(in config file .*old.yaml\) was replaced"):
        load_config(old_key)


def test_yaml_round_trip(tmp_path):
    import yaml

    cfg = load_config(None, ["trainer.steps=3"])
    out = tmp_path / "c.yaml"
    out.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(out) == cfg


def test_every_field_is_documented():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            if dataclasses.is_dataclass(f.type) if not isinstance(f.type, str) else False:
                walk(f.type)

    walk(Config)
    ref = config_reference()
    assert "`trainer.prompts_per_step`" in ref and "`rewards.functions.N.condition_on`" in ref


def test_readme_config_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", readme, re.DOTALL)
    assert m, "README.md lacks the generated config reference block"
    assert m.group(1) == config_reference(), "README config reference is stale: run `gdpo config-doc --write`"


def test_lr_schedules():
    from gdpo.learner import lr_factor

    cos = lr_factor(
        load_config(
            None,
            ["trainer.steps=10", "learner.lr_schedule=cosine", "learner.lr_warmup_steps=2", "learner.min_lr_ratio=0.1"],
        )
    )
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1) and cos(6) == pytest.approx(0.55)
    const = lr_factor(load_config(None, ["trainer.steps=10", "learner.lr_schedule=constant"]))
    assert const(0) == const(9) == 1.0


def test_correctness_aware_rewards_cannot_be_conditioned_and_l1_needs_its_target_in_the_prompt():
    with pytest.raises(ConfigError, match=r"rewards.functions.1.condition_on.*'kimi_length' reads correctness itself"):
        load_config(None, ["rewards.functions=[{name: accuracy}, {name: kimi_length, condition_on: accuracy}]"])
    load_config(None, ["rewards.functions=[{name: accuracy}, {name: kimi_length}]"])  # as its paper defines it
    with pytest.raises(ConfigError, match=r"'l1_exact' rewards meeting a target length that the prompt states"):
        load_config(None, ["rewards.functions=[{name: accuracy}, {name: l1_exact, kwargs: {target_tokens: 40}}]"])
    with pytest.raises(ConfigError, match=r"put \{target_tokens\} in data.template"):
        load_config(None, ["rewards.functions=[{name: accuracy}, {name: l1_max}]"])
    load_config(
        None,
        [
            "rewards.functions=[{name: accuracy}, {name: l1_max}]",
            "data.template='{question}\nThink for {target_tokens} tokens.\n'",
        ],
    )


def test_presets_load_by_name_from_any_directory_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the presets come from the package
    for spec in ("multireward_cpu", "multireward_cpu.yaml", "configs/multireward_cpu.yaml"):
        assert load_config(spec).rewards.functions[1].name == "chain_credit"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "multireward_cpu.yaml").write_text("trainer: {steps: 7}\n")
    assert load_config("configs/multireward_cpu.yaml").trainer.steps == 7  # a file that exists wins
    with pytest.raises(ConfigError, match=r"config file not found: multireward\.yaml \(nor a preset .*tiny_cpu"):
        load_config("multireward.yaml")
    with pytest.raises(ConfigError, match="config file not found: elsewhere/tiny_cpu.yaml"):
        load_config("elsewhere/tiny_cpu.yaml")  # a path with another directory is a path, not a preset


def test_interpolation_resolves_and_a_missing_target_is_named():
    cfg = load_config(None, ["trainer.output_dir=runs/${algorithm.estimator}-s${trainer.seed}", "trainer.seed=3"])
    assert cfg.trainer.output_dir == "runs/gdpo-s3"
    with pytest.raises(ConfigError, match=r"config key 'trainer.output_dir': .*'nope.x' not found"):
        load_config(None, ["trainer.output_dir=${nope.x}"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "rewards.functions=[{nme: accuracy}]",
            r"unknown config key 'rewards.functions.0.nme'; did you mean "
            r"'rewards.functions.0.name'",
        ),
        ("rewards.functions.1.weight=heavy", r"'rewards.functions.1.weight' must be a number, got 'heavy'"),
        ("rewards.functions.1.weight=.inf", r"'rewards.functions.1.weight' must be finite, got inf"),
        ("rewards.functions.0=3", r"'rewards.functions.0' must be a mapping, got 3"),
        ("learner=[1, 2]", r"'learner' must be a mapping, got list"),
        ("rollout.max_model_len=abc", r"'rollout.max_model_len' must be an integer or null, got 'abc'"),
        ("learner.target_modules=q_proj", r"'learner.target_modules' must be a list"),
        ("cluster.rollout_timeout_s=.inf", r"'cluster.rollout_timeout_s' must be finite"),
        ("rollout.cpu_reserved_cores=-1", r"'rollout.cpu_reserved_cores': must be >= 0, got -1"),
    ],
)
def test_omegaconf_errors_name_the_key_in_the_projects_words(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _bounded_fields(cls, prefix=""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _bounded_fields(hints[f.name], key + ".")
        elif f.metadata.get("bounds"):
            yield key, hints[f.name], f.metadata["bounds"]


def test_every_field_bound_is_enforced_and_documented():
    """For each bound in the schema's metadata, a value just outside it is refused naming the key."""
    checked = 0
    for key, tp, bounds in _bounded_fields(Config):
        whole = int in (tp, *getattr(tp, "__args__", ()))
        for op, limit in bounds.items():
            step = 1 if whole else 1e-3
            bad = {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[op]
            with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': must be"):
                load_config(None, [f"{key}={bad}"])
            checked += 1
    assert checked >= 40  # the schema's bounds are many; a walk that found none would pass vacuously
    ref = config_reference()
    assert "| `learner.dora_dropout` | float (in [0, 1)) |" in ref and "| `trainer.steps` | int (>= 1) |" in ref


def test_the_ofq_config_uses_the_same_loader(tmp_path):
    from compression.ofq.experiment import load_ofq_config

    cfg = load_ofq_config("ofq_digits_cpu", ["qat.bits=[4, 2]", "fp.lr=${qat.lr}"])
    assert cfg.qat.bits == (4, 2) and cfg.fp.lr == cfg.qat.lr
    with pytest.raises(ConfigError, match=r"unknown config key 'qat.bitz'; did you mean 'qat.bits'"):
        load_ofq_config("ofq_digits_cpu", ["qat.bitz=[4]"])
    with pytest.raises(ConfigError, match=r"config key 'qat.cga_br': must be in \(0, 0.5\), got 0.7"):
        load_ofq_config("ofq_digits_cpu", ["qat.cga_br=0.7"])


def test_cpu_threads_per_worker(monkeypatch):
    from gdpo.cpu_threads import cpu_threads_per_worker

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert cpu_threads_per_worker(3, 4) == 3  # an explicit setting wins
    assert cpu_threads_per_worker(0, 4) == 4  # 0: the cores shared among the workers
    assert cpu_threads_per_worker(0, 32) == 1  # never below one thread
    assert cpu_threads_per_worker(0, 4, share=2) == 2  # half the cores, shared among the workers
    from gdpo.cpu_threads import cpu_share

    assert cpu_share(load_config(None, [])) == 1  # on-policy: engines and learners take turns on the cores
    assert cpu_share(load_config(None, ["trainer.max_staleness=1"])) == 2  # overlapped: they split them
    assert cpu_share(load_config(None, ["trainer.max_staleness=1", "cluster.placement=separate"])) == 1
