"""Bad input on every command: a new user's mistakes and an attacker's inputs. Each case must end with
exit code 2 and one line on stderr that names the key, flag, file or sample, before any work starts
(no Ray, no engine, no training: every case returns in seconds), and no traceback."""

import json
from pathlib import Path

import pytest

from gdpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "helpers" / "bad_plugins"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")

    def write(name: str, data) -> str:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    out = {
        "latin1_yaml": write("latin1.yaml", "trainer:\n  steps: 3 # caf\xe9\n".encode("latin-1")),
        "bad_yaml": write("bad.yaml", "trainer: [steps: 3\n"),
        "list_yaml": write("list.yaml", "- 1\n- 2\n"),
        "python_tag": write("tag.yaml", "trainer: !!python/object/apply:os.system ['echo pwned']\n"),
        "bad_json": write("bad.jsonl", json.dumps(rows[0]) + "\n{not json\n"),
        "latin1_jsonl": write(
            "latin1.jsonl",
            json.dumps(rows[0]).encode() + b"\n" + '{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"),
        ),
        "empty_jsonl": write("empty.jsonl", ""),
        "array_jsonl": write("array.jsonl", "[1, 2]\n"),
        "no_column": write("nocol.jsonl", json.dumps({"q": "1+1?", "answer": "2"}) + "\n"),
        "mixed_gold": write(
            "mixed.jsonl",
            json.dumps(rows[0])
            + "\n"
            + json.dumps({"question": "3+3?", "answer": "3 and 3 make 6.\nSo 6 in all, 2 left"})
            + "\n",
        ),
        "prose_gold": write("prose.jsonl", json.dumps({"question": "q", "answer": "First 2.\nThen 4."}) + "\n"),
        "empty_gold": write("emptygold.jsonl", json.dumps({"question": "q", "answer": " "}) + "\n"),
        "a_file": write("plain.txt", "x"),
        "corrupt_results": write("corrupt_eval/results.json", "{half"),
        "no_metrics": write("nometrics_eval/results.json", json.dumps({"model": "m"})),
        "no_accuracy": write(
            "noacc_eval/results.json",
            json.dumps({"metrics": {"mean_tokens": 3.0, "prompts": 2, "samples_per_prompt": 1}}),
        ),
        "text_tokens": write(
            "texttok_eval/results.json",
            json.dumps({"metrics": {"accuracy": 0.5, "mean_tokens": "many", "prompts": 2, "samples_per_prompt": 1}}),
        ),
        "no_final_tokens": write("nofinal_run/summary.json", json.dumps({"final": {"accuracy": 0.9}})),
        "bad_lora": write("bad_lora/adapter_config.json", "{"),
        "lora_no_rank": write("lora_norank/adapter_config.json", json.dumps({"peft_type": "LORA"})),
        "ok_run": write("ok_run/summary.json", "{}"),
        "torn_middle": write("torn_run/metrics.jsonl", '{"step": 1}\n{"step": 2, "x"\n{"step": 3}\n'),
    }
    out["dir"] = str(d)
    return out


# (command line, fragment the one-line message must contain); {name} is a fixture file where one is named so
CASES = [
    # --- config keys and values (check-config, train, sft, demo share the loader)
    ("check-config trainer.stpes=3", "did you mean 'trainer.steps'"),
    ("check-config trainer.steps=abc", "trainer.steps"),
    ("check-config trainer.steps=0", "'trainer.steps': must be >= 1"),
    ("check-config learner.grad_clip=-1", "learner.grad_clip"),
    ("check-config learner.weight_decay=-0.1", "learner.weight_decay"),
    ("check-config cluster.num_cpus=0", "cluster.num_cpus"),
    ("check-config trainer.output_dir=", "trainer.output_dir"),
    ("check-config rewards.timeout_s=0", "rewards.timeout_s"),
    ("check-config cluster.learner_timeout_s=-5", "cluster.learner_timeout_s"),
    ("check-config cluster.max_restarts=-1", "cluster.max_restarts"),
    ("check-config rollout.top_p=0", "rollout.top_p"),
    ("check-config trainer=5 trainer.steps=3", "override key 'trainer.steps' goes below 'trainer'"),
    ("check-config model.path.x=1", "override key 'model.path.x' goes below 'model.path'"),
    ("check-config trainer.steps", "is not of the form key=value"),
    ("check-config rewards.functions.7.weight=2", "index '7' is out of range"),
    ("check-config rewards.functions.x.weight=2", "index 'x' is out of range"),
    ("check-config trainer.resume=maybe", "trainer.resume"),
    ("train trainer.stpes=3", "did you mean 'trainer.steps'"),
    ("demo learner.lr=-1", "learner.lr"),
    ("sft sft.steps=0", "sft.steps"),
    ("train --config /nonexistent/x.yaml", "config file not found: /nonexistent/x.yaml"),
    ("check-config --config {latin1_yaml}", "is not UTF-8 text"),
    ("check-config --config {bad_yaml}", "is not valid YAML"),
    ("check-config --config {list_yaml}", "must hold a mapping"),
    ("check-config --config {python_tag}", "is not valid YAML"),  # safe_load: no object-building tags
    # --- rewards and plugins
    ("check-config rewards.functions.0.name=nope", "unknown reward 'nope'"),
    ("check-config rewards.functions.0.name=os:system", "a reward is fn(prompts, completions, **fields)"),
    ("check-config rewards.functions.0.name=/nonexistent/r.py:f", "file not found"),
    (f"check-config rewards.functions.0.name={PLUGIN_DIR}/exits_at_import.py:reward", "SystemExit(3)"),
    (f"check-config rewards.functions.0.name={PLUGIN_DIR}/divides_at_import.py:reward", "ZeroDivisionError"),
    ("check-config rewards.functions.0.name=tests.helpers.plugins:nothing", "has no function 'nothing'"),
    ("check-config 'rewards.functions.1.kwargs={alph: 1}'", "has no parameter 'alph'"),
    ("check-config rewards.functions.1.condition_on=nope", "condition_on"),
    ("check-config rewards.functions.1.name=accuracy", "is listed twice"),
    ("check-config algorithm.filter_zero_variance=[nope]", "algorithm.filter_zero_variance"),
    ("check-config rewards.functions=[]", "needs at least one reward"),
    (
        "check-config rewards.functions.0.name=tests.helpers.plugins:needs_difficulty "
        "rewards.correctness=tests.helpers.plugins:needs_difficulty",
        "needs the field 'difficulty'",
    ),
    ("check-config rewards.correctness=efficient_sigmoid_typo", "'rewards.correctness': must name one of"),
    # --- data
    ("check-config data.train=/nonexistent/train.jsonl", "data file not found"),
    ("check-config data.train={bad_json}", "bad.jsonl:2: not valid JSON"),
    ("check-config data.train={latin1_jsonl}", "latin1.jsonl:2: not UTF-8 text"),
    ("check-config data.train={empty_jsonl}", "holds no rows"),
    ("check-config data.train={array_jsonl}", "expected a JSON object"),
    ("check-config data.train={no_column}", "sample 0 has no column 'question'"),
    ("check-config data.train={mixed_gold}", "sample 1's gold answer has no '#### N'"),
    ("check-config data.train={prose_gold}", "sample 0's gold answer is a multi-line text"),
    ("check-config data.train={empty_gold}", "sample 0 has an empty gold answer"),
    ("check-config 'data.template={question'", "data.template"),
    ("check-config 'data.template=\"{question.__class__}\"'", "is not a column name"),
    ("check-config 'data.template=x{}'", "is not a column name"),
    ("check-config data.train=hf:onlyname", "must look like 'hf:NAME:SPLIT'"),
    # --- eval
    ("eval --model /nonexistent/m --data task:chain_arith --out {dir}/e1", "--model /nonexistent/m: no such directory"),
    (
        "eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e2 --samples-per-prompt 0",
        "--samples-per-prompt",
    ),
    ("eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e3 --top-p 0", "--top-p"),
    ("eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e4 --pass-k abc", "--pass-k"),
    ("eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e5 --pass-k 5", "--pass-k"),
    ("eval --model builtin:tiny-chain-arith --data task:chain_arith --out {a_file}", "is a file"),
    (
        "eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e6 --base {dir}/corrupt_eval",
        "corrupt_eval/results.json: unreadable",
    ),
    (
        "eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e7 --base {dir}/nometrics_eval",
        "not a gdpo eval results file",
    ),
    (
        "eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e8 --lora {dir}/bad_lora",
        "bad_lora/adapter_config.json: unreadable",
    ),
    (
        "eval --model builtin:tiny-chain-arith --data task:chain_arith --out {dir}/e9 --lora {dir}/lora_norank",
        "no rank 'r'",
    ),
    # --- report
    ("report /nonexistent/run --out {dir}/r1", "/nonexistent/run: no such directory"),
    ("report {dir}/corrupt_eval --out {dir}/r2", "results.json: unreadable"),
    ("report {dir}/nometrics_eval --out {dir}/r3", "not a gdpo eval results file"),
    ("report {dir}/noacc_eval --out {dir}/r6", "noacc_eval/results.json: 'metrics' has no 'accuracy'"),
    ("report {dir}/texttok_eval --out {dir}/r7", "texttok_eval/results.json: 'metrics.mean_tokens' is 'many'"),
    ("report {dir}/nofinal_run --out {dir}/r8", "nofinal_run/summary.json: 'final' has no 'mean_tokens'"),
    ("report {dir}/torn_run --out {dir}/r4", "metrics.jsonl:2: damaged metrics row"),
    ("report {dir}/ok_run --out {a_file}", "is a file"),
    ("report {dir} --out {dir}/r5", "neither an eval directory"),
    # --- compare
    ("compare --seeds 0 --out {dir}/c1", "--seeds must be >= 1"),
    ("compare --estimators ' ' --out {dir}/c2", "compare needs arms"),
    ("compare --estimators grpo,foo --out {dir}/c3", "unknown arm 'foo'"),
    ("compare --estimators grpo,grpo --out {dir}/c4", "distinct names"),
    ("compare --arm nocolon --out {dir}/c5", "expected 'NAME: key=value ...'"),
    ("compare --joint accuracy,nope --out {dir}/c6", "--joint names ['nope']"),
    ("compare --samples-per-prompt 0 --out {dir}/c7", "--samples-per-prompt must be >= 1"),
    ("compare --estimators grpo trainer.stpes=3 --out {dir}/c8", "did you mean 'trainer.steps'"),
    # --- compress
    ("compress --model builtin:tiny-chain-arith --out {dir}/p1 --bits w3a3", "--bits"),
    ("compress --model builtin:tiny-chain-arith --out {dir}/p2 --pipeline foo", "--pipeline"),
    ("compress --model builtin:tiny-chain-arith --out {dir}/p3 --methods foo", "--methods"),
    ("compress --model builtin:tiny-chain-arith --out {dir}/p4 --pipeline fp4,eora --rank 0", "--rank"),
    ("compress --model builtin:tiny-chain-arith --out {dir}/p5 --pipeline fp4,eora --factor-bits 5", "--factor-bits"),
    # --- ofq
    ("ofq --config {bad_yaml} --out {dir}/o1", "is not valid YAML"),
    ("ofq --config /nonexistent.yaml --out {dir}/o2", "config file not found"),
]


@pytest.mark.parametrize("line, fragment", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_is_one_named_line_and_exit_2(files, capsys, line, fragment):
    import re
    import shlex

    argv = shlex.split(re.sub(r"\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), line))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    message = [ln for ln in err.splitlines() if ln.startswith("gdpo ")]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    assert len(message) == 1, err
    assert fragment in message[0], message[0]


def test_check_config_prints_the_resolved_config(capsys):
    assert main(["check-config", "trainer.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
