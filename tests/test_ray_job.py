"""The cluster path: `ray start --head` + `ray job submit` running `python -m gdpo.train`."""
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _ray(*args, env, timeout=300):
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_bin), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_training(tmp_path):
    from gdpo.config import load_config
    from gdpo.tasks.tiny_policy import ensure_tiny_policy

    cache = ROOT / ".cache" / "gdpo"
    ensure_tiny_policy(load_config(None, [f"sft.cache_dir={cache}"]).sft)  # built once, shared with the job
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    token = tmp_path / "ray_auth_token"  # Ray 2.5x guards the job API with a token; this run's own
    token.write_text(secrets.token_hex(32))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    started = _ray("start", "--head", "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--num-cpus=2",
                   "--disable-usage-stats", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        out = tmp_path / "job_run"
        args = ["job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
                sys.executable, "-m", "gdpo.train", "cluster.address=auto", f"sft.cache_dir={cache}",
                f"trainer.output_dir={out}", "trainer.steps=1", "trainer.prompts_per_step=4",
                "rollout.samples_per_prompt=4", "data.eval_size=8", "trainer.eval_every=0"]
        deadline = time.time() + 120
        while True:  # the head's job agent comes up a little after `ray start` returns
            submit = _ray(*args, env=env, timeout=900)
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout[-3000:], submit.stderr[-2000:])
        assert "succeeded" in submit.stdout.lower()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 1 and "accuracy" in summary["final"]
    finally:
        stopped = _ray("stop", "--force", env=env)
    assert stopped.returncode == 0
