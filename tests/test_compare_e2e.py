"""``gdpo compare`` end to end on the real stack, shrunk: 2 estimators x 1 seed x 2 steps, 8 held-out prompts."""

import json
from html.parser import HTMLParser

import pytest

from gdpo.cli import main

pytestmark = pytest.mark.e2e


def test_compare_trains_each_estimator_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--estimators",
        "grpo-matched,gdpo",
        "--joint",
        "accuracy",
        "--seeds",
        "1",
        "--samples-per-prompt",
        "2",
        "--out",
        str(out),
        "trainer.steps=2",
        "trainer.prompts_per_step=4",
        "trainer.eval_every=0",
        "data.eval_size=8",
        "learner.micro_batch_per_worker=16",
    ]
    assert main(args) == 0
    import ray

    assert not ray.is_initialized()  # the embedded Ray it started is stopped again
    printed = capsys.readouterr().out
    assert "arm" in printed and "grpo-matched" in printed and "gdpo" in printed
    summary = json.loads((out / "compare.json").read_text())
    weights = summary["matched_weights"]["grpo-matched"]  # 1/spread of each reward on the base policy's samples
    assert len(weights) == 2 and all(w > 0 for w in weights)
    for name in ("grpo-matched-seed0", "gdpo-seed0"):
        cfg = json.loads((out / "runs" / name / "config.json").read_text())
        assert cfg["algorithm"]["estimator"] == name.split("-")[0]
        res = json.loads((out / "evals" / name / "results.json").read_text())
        assert res["metrics"]["prompts"] == 8 and res["against_base"]["aes_coefficients"]["gamma"] == 5.0
        assert res["base"] == str((out / "evals" / "base").resolve())
    matched = json.loads((out / "runs" / "grpo-matched-seed0" / "config.json").read_text())
    assert [matched["rewards"]["functions"][k]["weight"] for k in range(2)] == pytest.approx(weights, rel=1e-5)
    assert [row[0] for row in summary["table"]["body"]] == ["grpo-matched", "gdpo"]
    assert summary["table"]["head"][2:7] == ["accuracy", "mean tokens", "truncation", "AES", "joint success"]
    assert 0 <= summary["per_run"]["gdpo-seed0"]["joint"] <= 1

    class Tables(HTMLParser):
        count = 0

        def handle_starttag(self, tag, attrs):
            self.count += tag == "table"

    page = Tables()
    page.feed((out / "report.html").read_text())
    assert page.count == 3  # estimators, evaluations, training runs
    assert "## Estimators" in (out / "report.md").read_text()

    # run again: everything is done, nothing is trained or evaluated twice
    mtime = (out / "evals" / "gdpo-seed0" / "results.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "evals" / "gdpo-seed0" / "results.json").stat().st_mtime == mtime
