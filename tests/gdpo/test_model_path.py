"""One resolver for every model path: ``gdpo train model.path=``, ``gdpo eval --model``, ``gdpo compress
--model`` and ``gdpo compare`` accept the same forms and refuse the same wrong ones before work starts."""

import json
import pathlib
import shutil

import pytest

from gdpo.config import BUILTIN_TINY_POLICY, ConfigError, load_config
from gdpo.policy import ModelPathError, resolve_model_path
from gdpo.preflight import prepare_run
from gdpo.tasks.tiny_policy import policy_dir

SFT = load_config().sft


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return path


def test_each_accepted_form_resolves_to_the_directory_that_is_loaded(tmp_path):
    hf = _model_dir(tmp_path / "hf")
    run = tmp_path / "runs" / "x"
    merged = _model_dir(run / "final" / "merged")
    (run / "config.json").write_text(json.dumps({"trainer": {"steps": 2}}))  # the run's own (gdpo) config
    assert resolve_model_path(str(hf), SFT) == str(hf)
    assert resolve_model_path(str(run), SFT) == str(merged)  # a run directory: its final policy
    assert resolve_model_path(str(run / "final"), SFT) == str(merged)  # a run's final/
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct", SFT) == "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id
    assert resolve_model_path(BUILTIN_TINY_POLICY, SFT, build=False) == str(policy_dir(SFT))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nowhere" / "a" / "b", "no such directory"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "not an HF model directory"),
        (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "not an HF model directory"),
    ],
)
def test_a_wrong_path_is_refused_naming_the_setting(tmp_path, make, message):
    path = str(make(tmp_path))
    with pytest.raises(ModelPathError, match=f"--model {path}: {message}"):
        resolve_model_path(path, SFT, what="--model")
    assert issubclass(ModelPathError, ConfigError)  # the CLI's bad-input exit (2) for every command


def test_train_accepts_a_run_directory_as_its_model_and_hands_the_workers_the_model_inside(tmp_path):
    tiny = resolve_model_path(BUILTIN_TINY_POLICY, SFT, log=lambda m: None)
    shutil.copytree(tiny, tmp_path / "runs" / "x" / "final" / "merged")
    cfg = load_config(None, [f"model.path={tmp_path / 'runs' / 'x' / 'final'}", "data.eval_size=4"])
    inputs = prepare_run(cfg, log=lambda m: None)
    assert inputs.model_path == str(tmp_path / "runs" / "x" / "final" / "merged")  # what every learner loads


def test_train_refuses_a_directory_that_holds_no_model_before_any_work(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    cfg = load_config(None, [f"model.path={tmp_path / 'runs' / 'x'}"])
    with pytest.raises(ConfigError, match="config key 'model.path' = .*runs/x: not an HF model directory"):
        prepare_run(cfg, log=lambda m: None)


def test_a_saved_copy_of_the_policy_tokenizes_as_the_policy_was_trained(tmp_path):
    """transformers' save_pretrained would write Qwen2's pre-tokenizer (digits split) over the tiny
    policy's own (whole numbers): a final/ or compressed copy would then count its floor differently."""
    from transformers import AutoTokenizer

    from gdpo.policy import save_tokenizer
    from gdpo.preflight import solution_encoder

    tiny = resolve_model_path(BUILTIN_TINY_POLICY, SFT, log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    save_tokenizer(tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (pathlib.Path(tiny) / "tokenizer.json").read_bytes()
    text = "14-3=11\n11+25=36\n\\boxed{36}"
    assert solution_encoder(str(tmp_path), tokenizer)(text) == solution_encoder(tiny, tokenizer)(text)
    tokenizer.save_pretrained(tmp_path / "plain")  # what was written before: another count of the same text
    assert solution_encoder(str(tmp_path / "plain"), tokenizer)(text) != solution_encoder(tiny, tokenizer)(text)
