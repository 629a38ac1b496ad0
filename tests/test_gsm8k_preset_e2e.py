"""The GPU preset's data path trained for real on CPU: configs/gsm8k_qwen2.5_1.5b.yaml with its template,
chat template, `#### N` golds, ZeRO-3 and the shared GSM8K data, on a small local model that has a chat
template (random weights), with the engines sleeping through the update at level 2 (vLLM's CPU backend
frees no memory, but the sleep, the wake and the reload of the base weights run)."""

import json
from pathlib import Path

import pytest

from tests.gdpo.test_preflight import _preset, needs_gsm8k
from tests.helpers.chat_model import build_chat_model

pytestmark = pytest.mark.e2e


@needs_gsm8k
def test_gsm8k_preset_trains_with_sleeping_engines(tmp_path):
    import ray

    from gdpo.trainer import train

    model = build_chat_model(tmp_path / "chat")
    out = tmp_path / "run"
    cfg = _preset(
        f"model.path={model}",
        f"trainer.output_dir={out}",
        "model.dtype=float32",
        "learner.num_workers=1",
        "rollout.num_workers=1",
        "rewards.num_workers=1",
        "rewards.verifier_processes=1",
        "trainer.steps=2",
        "trainer.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=32",
        "data.eval_size=4",
        "learner.micro_batch_per_worker=8",
        "learner.lr=1e-3",
        "rollout.sleep_level=2",
        "learner.zero_stage=3",  # the preset's is 2 (a 1.5B model fits every GPU); ZeRO-3 sleeps here too
    )
    assert cfg.data.use_chat_template and cfg.learner.zero_stage == 3 and cfg.cluster.placement == "colocated"
    try:
        summary = train(cfg, log=lambda m: None)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    assert all(r["time/sleep"] > 0 for r in rows)  # the engines slept and woke every step
    # step 2 sampled after a level-2 wake (base reloaded from disk) and the sync: the engine holds the learner's policy
    assert rows[1]["logprob_drift"] < 1e-3, rows[1]["logprob_drift"]
    assert rows[0]["tokens/mean"] > 0 and "accuracy" in summary["final"]
    assert (Path(out) / "final" / "adapter" / "adapter_config.json").is_file()
