"""The memory plan: the learner's estimate against a measured peak on the CPU, the GSM8K preset's fit on
80 GB GPUs, and the refusals, each naming the keys to change."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from gdpo import memory_plan
from gdpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
QWEN_1_5B = memory_plan.ModelShape.of(AutoConfig.from_pretrained(ROOT / "configs" / "models" / "qwen2.5-1.5b"))


def _preset(*overrides):
    return load_config("gsm8k_qwen2.5_1.5b", list(overrides))


def test_the_estimate_is_within_a_quarter_of_a_measured_update_peak():
    from bench.bench_memory_plan import SHAPES, measure

    for chunk in (0, 64):  # the full logits, the chunked head
        measured, estimate = measure(SHAPES[0], rank=8, chunk=chunk)  # the plan's formula against LiveBytes
        assert abs(estimate / measured - 1) < 0.25, (chunk, measured, estimate)


def test_the_model_shape_counts_qwen2_5_1_5b():
    assert QWEN_1_5B.params() == pytest.approx(1.5437e9, rel=1e-3)  # Qwen2.5-1.5B: 1.54B with tied embeddings
    assert QWEN_1_5B.adapter_params(("q_proj",), 8) == 28 * (8 * (1536 + 1536) + 1536)


def test_the_gsm8k_preset_fits_an_80_gb_gpu_and_its_old_sizing_did_not():
    cfg = _preset()
    plan = memory_plan.plan(cfg, QWEN_1_5B, 256, cfg.cluster.gpu_memory_gb)
    assert memory_plan.refusal(plan, cfg) is None
    assert plan.update_phase < memory_plan.HEADROOM * 79.6 and plan.rollout_phase < memory_plan.HEADROOM * 79.6
    old = _preset(
        "rollout.sleep_level=0",
        "rollout.gpu_memory_utilization=0.45",
        "learner.zero_stage=3",
        "learner.num_workers=4",
        "rollout.num_workers=2",
        "learner.logprob_chunk_tokens=0",
    )  # fmt: skip  (and the full [tokens x vocab] logits it had then)
    why = memory_plan.refusal(memory_plan.plan(old, QWEN_1_5B, 256, 79.6), old)
    assert "rollout.sleep_level=1" in why and "learner.micro_batch_per_worker" in why


def test_full_logits_grow_with_tokens_and_chunked_ones_stay_at_one_chunk():
    for chunk, grows in ((0, True), (1024, False)):
        short = memory_plan.plan(_preset(f"learner.logprob_chunk_tokens={chunk}"), QWEN_1_5B, 256, None)
        longer = memory_plan.plan(
            _preset(f"learner.logprob_chunk_tokens={chunk}", "rollout.max_new_tokens=2304"), QWEN_1_5B, 256, None
        )
        assert longer.tokens_per_micro_batch == 2 * short.tokens_per_micro_batch
        assert longer.activations == pytest.approx(2 * short.activations)
        assert longer.logits == pytest.approx((2 if grows else 1) * short.logits)
    assert short.logits == pytest.approx(1024 * QWEN_1_5B.vocab * 8 / 2**30)
    assert short.activations_checkpointed < short.activations / 5
    checkpointed = memory_plan.plan(_preset("learner.gradient_checkpointing=true"), QWEN_1_5B, 256, None)
    assert checkpointed.activations == pytest.approx(short.activations_checkpointed)


def test_a_token_budget_sets_the_micro_batch_size():
    budget = memory_plan.plan(_preset("learner.max_tokens_per_micro_batch=4096"), QWEN_1_5B, 256, None)
    assert budget.tokens_per_micro_batch == 4096
    whole = memory_plan.plan(_preset("learner.max_tokens_per_micro_batch=512"), QWEN_1_5B, 256, None)
    assert whole.tokens_per_micro_batch == 256 + 1024  # a longer sequence still goes whole


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["learner.micro_batch_per_worker=64"], ["learner.micro_batch_per_worker"]),
        (["rollout.gpu_memory_utilization=0.9"], ["rollout.gpu_memory_utilization", "cluster.placement"]),
        (["rollout.gpu_memory_utilization=0.03"], ["rollout.gpu_memory_utilization"]),  # no room for a KV cache
    ],
)
def test_a_run_that_cannot_fit_is_refused_naming_the_keys(overrides, keys):
    cfg = _preset(*overrides)
    why = memory_plan.refusal(memory_plan.plan(cfg, QWEN_1_5B, 256, cfg.cluster.gpu_memory_gb), cfg)
    assert why is not None and all(k in why for k in keys), why


def test_check_config_prints_the_plan_and_refuses_before_ray(tmp_path, capsys):
    from gdpo.cli import main
    from tests.helpers.chat_model import build_chat_model

    model = build_chat_model(tmp_path / "m")
    args = ["check-config", "--config", "tiny_cpu", f"model.path={model}"]
    assert main(args + ["cluster.gpu_memory_gb=8"]) == 0
    err = capsys.readouterr().err
    assert "memory plan: learner:" in err and "in the update" in err
    assert main(args + ["cluster.gpu_memory_gb=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "memory plan: the learner's update needs" in err[-1] and "Traceback" not in "".join(err)


def test_an_unknown_gpu_size_plans_nothing_for_training():
    from gdpo import preflight

    cfg = load_config()
    assert preflight.gpu_memory_gib(cfg) is None  # this CPU machine: nothing to plan unless told
    with pytest.raises(ConfigError, match="memory plan"):
        preflight.check_memory(
            load_config(None, ["cluster.gpu_memory_gb=0.01"]),
            str(ROOT / "configs" / "models" / "qwen2.5-1.5b"),
            32,
            log=lambda m: None,
        )
