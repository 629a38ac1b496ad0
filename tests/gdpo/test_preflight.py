"""Inputs a run needs are loaded and checked before Ray starts; each failure names the key, file or sample."""

import os
from pathlib import Path

import pytest

from gdpo.config import ConfigError, load_config
from gdpo.data import DataError
from gdpo.preflight import prepare_run
from tests.helpers.chat_model import build_chat_model

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "gsm8k_qwen2.5_1.5b.yaml"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K / "train.jsonl").is_file(), reason="the shared GSM8K data is not beside the project"
)


def _preset(*overrides):
    return load_config(
        PRESET,
        [
            f"data.train={GSM8K / 'train.jsonl'}",
            f"data.eval={GSM8K / 'test.jsonl'}",
            "cluster.address=null",
            *overrides,
        ],
    )


@needs_gsm8k
def test_a_missing_chat_template_stops_train_before_ray_starts(tmp_path):
    import ray

    from gdpo.policy import resolve_model_path
    from gdpo.trainer import train

    tiny = resolve_model_path(
        load_config().model.path, load_config().sft, log=lambda m: None
    )  # its tokenizer has no chat template
    cfg = _preset(f"model.path={tiny}", f"trainer.output_dir={tmp_path}")
    with pytest.raises(
        DataError, match="data.train: data.use_chat_template is true but the tokenizer has no chat template"
    ):
        train(cfg, log=lambda m: None)
    assert not ray.is_initialized()


@needs_gsm8k
def test_the_gsm8k_preset_data_path_with_a_chat_model(tmp_path):
    model = build_chat_model(tmp_path / "chat")
    inputs = prepare_run(_preset(f"model.path={model}", "rollout.max_new_tokens=64"), log=lambda m: None)
    assert len(inputs.train) == 7473 and len(inputs.eval) == 500  # data.eval_size of the preset
    first = inputs.train.prompts[0]
    assert first.startswith("<|im_start|>user\nNatalia sold clips") and first.endswith("<|im_start|>assistant\n")
    assert "put your final answer within \\boxed{}." in first  # the preset's template, braces unescaped
    assert inputs.train.columns["answer"][0].endswith("#### 72")
    assert inputs.context == 2048 and 0 < inputs.longest_prompt < 2048 - 64


@needs_gsm8k
def test_prompts_longer_than_the_context_and_a_context_past_the_model_are_refused(tmp_path):
    model = build_chat_model(tmp_path / "chat", max_positions=512)
    with pytest.raises(
        ConfigError,
        match=r"data source '.*train.jsonl': sample \d+ has a \d+-token prompt; with "
        r"rollout.max_new_tokens = 1024 it exceeds the engines' context of 512",
    ):
        prepare_run(_preset(f"model.path={model}"), log=lambda m: None)
    with pytest.raises(
        ConfigError,
        match=r"'rollout.max_model_len' = 4096 exceeds the model's context "
        r"\(max_position_embeddings = 512",
    ):
        prepare_run(_preset(f"model.path={model}", "rollout.max_model_len=4096"), log=lambda m: None)


def test_an_unloadable_model_path_is_named(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'model.path' = /.*nowhere: no such directory"):
        prepare_run(load_config(None, [f"model.path={tmp_path / 'nowhere'}"]), log=lambda m: None)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')  # no tokenizer files
    with pytest.raises(ConfigError, match=r"'model.path' = '.*model': no tokenizer could be loaded"):
        prepare_run(load_config(None, [f"model.path={tmp_path / 'model'}"]), log=lambda m: None)


def test_engine_settings_are_checked_with_the_config():
    for overrides, message in (
        (["rollout.max_model_len=100", "rollout.max_new_tokens=128"], "must exceed rollout.max_new_tokens"),
        (["rollout.sleep_level=1", "cluster.placement=separate"], "needs cluster.placement=colocated"),
        (["rollout.sleep_level=2", "trainer.max_staleness=1"], "cannot sleep through it"),
        (["rollout.sleep_level=3"], "not allowed"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
