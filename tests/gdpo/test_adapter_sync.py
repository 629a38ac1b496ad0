"""The adapter-only weight path into vLLM (``learner.adapter=lora``): plain LoRA learner -> peft adapter ->
file or gloo broadcast -> the engine's policy LoRA, checked against the learner's own log-probs."""

import json
from pathlib import Path

import pytest
import torch

from gdpo import dora, learner, learner_sync, rollout, weight_sync
from gdpo.config import load_config
from gdpo.policy import resolve_model_path
from gdpo.records import WeightUpdate
from gdpo.weight_sync import SyncError
from tests.gdpo.test_weight_sync import _broadcast, _learner_logprobs, _worst

PROMPTS = ["Compute 3+4-2\n", "Compute 9-1+5\n"]


def _lora_policy(path, cfg, seed):
    """The learner's LoRA policy with B != 0 (a fresh adapter is the base exactly)."""
    model, tok = learner.build_policy(path, cfg)
    torch.manual_seed(seed)
    for _, layer in dora.dora_layers(model):
        assert not layer.use_dora
        layer.lora_B.data += 0.05 * torch.randn_like(layer.lora_B)
    return model, tok


def _adapter_cfg():
    return load_config(None, ["learner.adapter=lora"])


@pytest.fixture(scope="module")
def lora_engine():
    """An engine as a LoRA run starts it: LoRA enabled at the learner's rank, in-process (the CPU default)."""
    cfg = _adapter_cfg()
    assert cfg.learner.syncs_adapter
    path = resolve_model_path(cfg.model.path, cfg.sft, log=lambda m: None)
    llm = rollout.make_engine(path, cfg, lora_rank=cfg.learner.dora_rank)
    yield llm, cfg, path
    rollout.close_engine(llm)


@pytest.mark.e2e
def test_engine_serves_each_adapter_version_as_the_learner_computes_it(lora_engine, tmp_path):
    llm, cfg, path = lora_engine
    batch = rollout.generate(llm, PROMPTS, 4, max_new_tokens=48, temperature=1.0, seed=3)
    model, tok = _lora_policy(path, cfg, 0)
    names = weight_sync.sync_module_names(model, cfg.learner.target_modules)
    learner_lp = _learner_logprobs(model, batch, tok.pad_token_id)
    base = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)

    # the file transport: a peft adapter directory, a small fraction of the merged layers' bytes
    msg = learner_sync.publish_weights(model, names, 1, directory=str(tmp_path / "pub"), adapter=True)
    assert msg.adapter and sorted(p.name for p in Path(msg.path).iterdir()) == [
        weight_sync.ADAPTER_CONFIG,
        weight_sync.ADAPTER_WEIGHTS,
    ]
    merged = sum(t.nbytes for t in weight_sync.sync_tensors(model, names))
    assert msg.num_bytes < 0.25 * merged, (msg.num_bytes, merged)
    bad = WeightUpdate(**{**msg.__dict__, "checksum": "0" * 64})
    with pytest.raises(SyncError, match="corrupt"):
        weight_sync.engine_load_file(llm, bad)
    assert rollout.engine_state(llm) == (0, None)  # refused before anything was loaded
    assert weight_sync.engine_load_file(llm, msg) == 1
    assert rollout.engine_state(llm) == (1, msg.path)
    fresh = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(fresh, learner_lp) < 1e-3, _worst(fresh, learner_lp)
    assert _worst(base, learner_lp) > 1e-2  # the check can fail: the base alone disagrees
    # sampling goes through the adapter too: the sampler's log-probs are the learner's
    sampled = rollout.generate_checked(llm, 1, PROMPTS, 2, max_new_tokens=24, temperature=1.0, seed=5)
    worst = _worst(sampled.sampling_logprobs, _learner_logprobs(model, sampled, tok.pad_token_id))
    assert worst < 1e-3, worst

    # the broadcast: what an engine on another node runs, here over loopback gloo
    model2, _ = _lora_policy(path, cfg, 1)
    tensors = learner_sync.sync_payload(model2, names, adapter=True)
    assert all(".lora_A.weight" in t.name or ".lora_B.weight" in t.name for t in tensors)
    _, config = learner_sync.sync_manifest(model2, names, adapter=True)
    learner_lp2 = _learner_logprobs(model2, batch, tok.pad_token_id)
    assert len(weight_sync.plan(weight_sync.manifest_of(tensors), 64 << 10)) >= 2
    refused = _broadcast(llm, tensors, 2, expect=3, adapter_config=config)
    assert isinstance(refused, SyncError) and "expected policy version 3" in str(refused)
    damaged = _broadcast(llm, tensors, 2, corrupt_call=2 + 2 * 1, adapter_config=config)  # bucket 1 damaged
    assert isinstance(damaged, SyncError) and "bucket 1 of" in str(damaged)
    # an adapter goes in whole or not at all: the engine is still on version 1, not torn
    assert rollout.engine_state(llm) == (1, msg.path)
    assert _worst(rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids), learner_lp) < 1e-3
    assert _broadcast(llm, tensors, 2, adapter_config=config) == 2
    version, where = rollout.engine_state(llm)
    assert version == 2 and where != msg.path and json.loads(Path(where, weight_sync.ADAPTER_CONFIG).read_text())
    after = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(after, learner_lp2) < 1e-3, _worst(after, learner_lp2)
    assert _worst(after, learner_lp) > 1e-2
    assert _broadcast(llm, tensors, 3, adapter_config=config) == 3  # the engine's older directories go
    assert sorted(p.name for p in Path(where).parent.iterdir()) == ["owner", "policy-v3.lora"]

    # merged weights (an evaluation loading a checkpoint) replace the policy adapter
    assert weight_sync.engine_load_checkpoint(llm, path) == 0 and rollout.engine_state(llm) == (0, None)
    back = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(back, [torch.tensor(b) for b in base]) < 1e-4


@pytest.mark.e2e
def test_after_an_adapter_sync_cached_prompt_blocks_are_not_reused(lora_engine, tmp_path):
    """A prompt cached under version 1 is not continued from version 1's keys and values under version 2.
    Two guards: vLLM's prefix cache keys a block on the LoRA's name and path (each version has its own
    directory), and every sync drops the cache. With neither (one path for every version, no reset) this
    test's version 2 is off by 1.49 in log-prob (checked by hand, 2026-12-05)."""
    llm, cfg, path = lora_engine
    cache = llm.llm_engine.vllm_config.cache_config
    prompt = "Compute " + "+".join(str(d) for d in [3, 4, 2, 7, 1, 9, 3, 2, 8, 5] * 9) + "\n"
    assert cache.enable_prefix_caching and len(llm.get_tokenizer().encode(prompt)) > cache.block_size + 8
    names = None
    for version, seed in ((1, 2), (2, 3)):
        model, tok = _lora_policy(path, cfg, seed)
        names = names or weight_sync.sync_module_names(model, cfg.learner.target_modules)
        msg = learner_sync.publish_weights(model, names, version, directory=str(tmp_path), adapter=True)
        weight_sync.engine_load_file(llm, msg)
        batch = rollout.generate_checked(llm, version, [prompt], 2, max_new_tokens=16, temperature=1.0, seed=1)
        worst = _worst(batch.sampling_logprobs, _learner_logprobs(model, batch, tok.pad_token_id))
        assert worst < 1e-3, (version, worst)  # version 2 reads the prompt version 1 cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-v2.lora"]  # older versions removed
    weight_sync.engine_load_checkpoint(llm, path)  # the base again


def test_a_published_adapter_is_checked_before_an_engine_loads_it(tmp_path):
    """Without vLLM: the checksum, the version in the header and the config beside the weights."""
    from tests.gdpo.test_learner_sync import _adapted_lm

    lora = _adapted_lm(use_dora=False)
    tensors = weight_sync.adapter_tensors(lora, torch.float32)
    config = dora.peft_config(lora)
    path, digest, size = weight_sync.publish(tensors, 4, 1 << 16, directory=str(tmp_path), adapter_config=config)
    assert size == (Path(path) / weight_sync.ADAPTER_WEIGHTS).stat().st_size and config["use_dora"] is False
    weight_sync.check_adapter_dir(path, 4, digest)
    again = weight_sync.publish(tensors, 4, 1 << 16, directory=str(tmp_path), adapter_config=config)
    assert again == (path, digest, size)  # re-sent for an engine catching up: the same directory, intact
    weight_sync.check_adapter_dir(path, 4, digest)
    with pytest.raises(SyncError, match="holds policy version 4, expected 5"):
        weight_sync.check_adapter_dir(path, 5, digest)
    with pytest.raises(SyncError, match="corrupt"):
        weight_sync.check_adapter_dir(path, 4, "f" * 64)
    conf = Path(path) / weight_sync.ADAPTER_CONFIG
    conf.write_text(json.dumps({**config, "lora_alpha": 99}))
    with pytest.raises(SyncError, match="adapter_config.json differs"):
        weight_sync.check_adapter_dir(path, 4, digest)
    # what an engine loads is the adapter peft saves for the same model (names, shapes, values)
    from safetensors.torch import load_file

    dora.save_adapter(lora, tmp_path / "saved")
    sent, saved = (
        load_file(str(Path(path) / weight_sync.ADAPTER_WEIGHTS)),
        load_file(str(tmp_path / "saved" / dora.WEIGHTS_NAME)),
    )
    assert sent.keys() == saved.keys() and all(torch.equal(sent[k], saved[k]) for k in sent)
    weight_sync.publish(tensors, 5, 1 << 16, directory=str(tmp_path), adapter_config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-v5.lora", "saved"]  # version 4 removed
    with pytest.raises(ValueError, match="DoRA layer"):
        weight_sync.adapter_tensors(_adapted_lm(), torch.float32)


def test_an_adapter_sync_needs_plain_lora():
    from gdpo.config import ConfigError

    assert not load_config(None, []).learner.syncs_adapter  # DoRA: merged weights
    assert not load_config(None, ["learner.adapter=lora", "learner.sync_as=merged"]).learner.syncs_adapter
    with pytest.raises(ConfigError, match="learner.sync_as.*vLLM serves plain LoRA"):
        load_config(None, ["learner.sync_as=adapter"])
    with pytest.raises(ConfigError, match="learner.dora_rank.*512"):
        load_config(None, ["learner.adapter=lora", "learner.dora_rank=640"])
