"""The run directory under crashes, damage, reuse and config changes: the real driver loop
(``gdpo.trainer._run``) and run-directory code (``gdpo.checkpoints``) over an in-process stand-in for the
Ray cluster (tests/helpers/fake_run.py). A killed process is a real ``os._exit`` in a subprocess; the
resume runs in a fresh one, and must end exactly where a straight run ends."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gdpo.config import ConfigError
from tests.helpers import fake_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6  # save_every 2, eval_every 3: checkpoints at 2, 4, 6


def _proc(out: Path, steps: int = STEPS, crash: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.helpers.fake_run", str(out), str(steps), *([crash] if crash else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outcome(out: Path) -> dict:
    """What a run leaves that must not depend on crashes: policy, metrics rows (minus timings), summary."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drop = ("time/", "perf/", "sync/MB_per_s")
    rows = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]
    return {
        "policy": json.loads((out / "final" / "policy.json").read_text()),
        "rows": rows,
        "summary": json.loads((out / "summary.json").read_text()),
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    fake_run.run(str(out), STEPS)
    result = _outcome(out)
    assert [r["step"] for r in result["rows"]] == list(range(1, STEPS + 1))
    assert result["policy"] != 0.0
    return result


@pytest.mark.parametrize(
    "crash",
    ["after_baseline", "after_row@3", "torn_row@3", "before_manifest@4", "after_commit@4", "after_row@6", "in_final"],
)
def test_a_kill_anywhere_then_resume_ends_as_the_straight_run(tmp_path, straight, crash):
    out = tmp_path / "run"
    killed = _proc(out, crash=crash)
    assert killed.returncode == 137, (killed.returncode, killed.stderr[-2000:])
    fake_run.run(str(out), STEPS)  # the resubmission (in this process: nothing of the killed one is left)
    assert _outcome(out) == straight
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]


def test_the_baseline_is_never_measured_on_a_trained_policy(tmp_path, straight):
    """A kill right after the first checkpoint: the resume keeps the baseline measured before step 1."""
    out = tmp_path / "run"
    assert _proc(out, crash="after_commit@2").returncode == 137
    assert json.loads((out / "summary.json").read_text())["baseline"] == straight["summary"]["baseline"]
    fake_run.run(str(out), STEPS)
    assert _outcome(out)["summary"]["baseline"] == straight["summary"]["baseline"]


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


@pytest.mark.parametrize("damage", ["empty_state", "truncated_learner_file", "missing_manifest", "flipped_byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, straight, damage):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@5").returncode == 137  # checkpoints 2 and 4 kept
    newest = _checkpoint(out, 4)
    if damage == "empty_state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "truncated_learner_file":
        f = newest / "deepspeed" / "state.json"
        f.write_bytes(f.read_bytes()[:5])
    elif damage == "missing_manifest":
        (newest / "manifest.json").unlink()
    else:
        f = newest / "rng.json"
        data = bytearray(f.read_bytes())
        data[100] ^= 1
        f.write_bytes(bytes(data))
    logs = []
    fake_run.run(str(out), STEPS, log=logs.append)
    assert any("skipping checkpoint" in m and "step-000004" in m for m in logs), logs
    assert any("resumed from" in m and "step-000002" in m for m in logs), logs
    assert _outcome(out) == straight


def test_no_intact_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@5").returncode == 137
    for step in (2, 4):
        (_checkpoint(out, step) / "manifest.json").unlink()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="none of .* checkpoints is intact"):
        fake_run.run(str(out), STEPS)
    assert (out / "metrics.jsonl").read_text() == before


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_reused_output_dir_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "run"
    fake_run.run(str(out), 4)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"holds a run already.*trainer.resume=auto"):
        fake_run.run(str(out), 4, "trainer.resume=never")
    assert _snapshot(out) == before


def test_a_finished_run_is_not_run_again(tmp_path):
    out = tmp_path / "run"
    first = fake_run.run(str(out), 4)
    before = _snapshot(out)
    again = fake_run.run(str(out), 4)
    assert again == first and _snapshot(out) == before


def test_a_finished_run_extends_when_steps_grow(tmp_path, straight):
    """trainer.steps is resume-safe under a constant lr: 4 steps, then the same run to 6, is a 6-step run."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    fake_run.run(str(out), 4, "learner.lr_schedule=constant")
    fake_run.run(str(out), STEPS, "learner.lr_schedule=constant")
    fake_run.run(str(whole), STEPS, "learner.lr_schedule=constant")
    assert _outcome(out)["policy"] == _outcome(whole)["policy"]
    assert _outcome(out)["rows"] == _outcome(whole)["rows"]


def test_a_finished_run_without_checkpoints_cannot_be_extended(tmp_path):
    out = tmp_path / "run"
    fake_run.run(str(out), 4, "learner.lr_schedule=constant")
    for ckpt in (out / "checkpoints").glob("step-*"):
        for f in sorted(ckpt.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        ckpt.rmdir()
    with pytest.raises(ConfigError, match="checkpoints are gone"):
        fake_run.run(str(out), STEPS, "learner.lr_schedule=constant")


@pytest.mark.parametrize(
    "change",
    [
        "learner.lr=5e-3",
        "trainer.seed=7",
        "algorithm.estimator=grpo",
        "trainer.prompts_per_step=4",
        "data.eval_size=3",
        "rewards.functions.1.kwargs.alpha=0.2",
    ],
)
def test_a_changed_config_is_refused_naming_the_key(tmp_path, change):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@3").returncode == 137
    before = _snapshot(out)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"changed config: {key}: .*trainer.force_resume"):
        fake_run.run(str(out), STEPS, change)
    assert _snapshot(out) == before


def test_force_resume_continues_with_the_changed_key_named(tmp_path):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@3").returncode == 137
    logs = []
    fake_run.run(str(out), STEPS, "learner.lr=5e-3", "trainer.force_resume=true", log=logs.append)
    assert any("force_resume" in m and "learner.lr: " in m and " -> 0.005" in m for m in logs), logs
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_resume_safe_changes_pass_and_are_logged(tmp_path, straight):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@3").returncode == 137
    logs = []
    fake_run.run(
        str(out), STEPS, "trainer.eval_every=3", "rollout.num_workers=2", "cluster.sync_timeout_s=60", log=logs.append
    )
    assert any("resuming with" in m and "rollout.num_workers: 1 -> 2" in m for m in logs), logs
    assert _outcome(out) == straight


def test_cosine_schedule_makes_steps_unsafe(tmp_path):
    out = tmp_path / "run"
    fake_run.run(str(out), 4, "learner.lr_schedule=cosine")
    with pytest.raises(ConfigError, match="trainer.steps: 4 -> 6"):
        fake_run.run(str(out), STEPS, "learner.lr_schedule=cosine")


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no gdpo run"):
        fake_run.run(str(out), 2)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        fake_run.run(str(afile), 2)


def test_a_new_run_directory_is_private(tmp_path):
    out = tmp_path / "run"
    fake_run.run(str(out), 2)
    assert (out.stat().st_mode & 0o777) == 0o700
    assert (_checkpoint(out, 2).parent.stat().st_mode & 0o077) == 0


def test_a_damaged_middle_metrics_row_is_an_error_naming_the_line(tmp_path):
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@5").returncode == 137
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:30]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: damaged metrics row"):
        fake_run.run(str(out), STEPS)


def test_resume_never_unpickles_the_checkpoint(tmp_path):
    """rng.json replaced the pickled rng.pt: a planted pickle in the checkpoint is never loaded."""
    out = tmp_path / "run"
    assert _proc(out, crash="after_row@3").returncode == 137
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (_checkpoint(out, 2) / "rng.pt").write_bytes(pickle.dumps(Payload()))
    fake_run.run(str(out), STEPS)
    assert not marker.exists()
