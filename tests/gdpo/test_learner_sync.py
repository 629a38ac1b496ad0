"""Learner pieces without Ray or DeepSpeed: the streamed weight file and the importance-ratio denominator."""
import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gdpo import dora, learner
from gdpo.config import load_config
from gdpo.losses import token_logprobs
from gdpo.records import TrainBatch


def _adapted_lm(seed=0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    dora.apply_dora(model, ["q_proj", "v_proj", "down_proj"], 4, 8.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data += 0.1 * torch.randn_like(p)  # B != 0: merged weights differ from the base
    return model


@pytest.mark.parametrize("bucket_bytes", [1, 5000, 1 << 24])
def test_streamed_weight_file_is_a_safetensors_file_of_the_merged_weights(tmp_path, bucket_bytes):
    model = _adapted_lm()
    names = learner.sync_module_names(model, ("q_proj", "v_proj", "down_proj"))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "down_proj"}  # k: stack mate
    path = tmp_path / "w.safetensors"
    digest, size = learner.write_merged_weights(model, names, str(path), {"policy_version": "3"}, bucket_bytes)
    data = path.read_bytes()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    expected = learner.merged_weights(model, names)
    got = load_file(str(path))
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           model.model.layers[0].self_attn.q_proj.base_layer.weight)  # merged, not the base
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"policy_version": "3"}


def test_publish_replaces_the_previous_version_and_reports_bytes(tmp_path):
    model = _adapted_lm(dtype=torch.bfloat16)
    names = learner.sync_module_names(model, ("q_proj",))
    first = learner.publish_weights(model, names, 1, str(tmp_path), bucket_mb=1)
    second = learner.publish_weights(model, names, 2, str(tmp_path), bucket_mb=1)
    assert [p.name for p in tmp_path.iterdir()] == ["policy-v2.safetensors"]
    assert second.num_bytes == (tmp_path / "policy-v2.safetensors").stat().st_size
    assert second.checksum != first.checksum  # the header carries the version
    assert second.names == first.names and len(second.names) == 12  # q and its stack mates k, v: weight + bias, 2 layers
    assert load_file(second.path)["model.layers.1.self_attn.k_proj.weight"].dtype == torch.bfloat16


def _batch(model, g):
    ids = torch.randint(1, 64, (4, 12), generator=g)
    att = torch.ones_like(ids)
    mask = torch.zeros(4, 12)
    mask[:, 5:] = 1
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    return TrainBatch(ids, att, mask, torch.randn(4, generator=g), sampling_logprobs=lp * mask[:, 1:])


def test_behaviour_logprobs_on_policy_off_policy_and_minibatched():
    model = _adapted_lm()
    batch = _batch(model, torch.Generator().manual_seed(0))
    logp = torch.randn(4, 11, requires_grad=True)
    on = load_config(None, ["algorithm.kl_coef=0"])
    got = learner.behaviour_logprobs(batch, logp, on)
    assert torch.equal(got, logp.detach()) and not got.requires_grad  # one step on-policy: the forward's own
    assert not learner.needs_logprob_pass(on)
    with_kl = load_config(None, ["algorithm.kl_coef=0.05"])  # a reference pass, still no old-log-prob pass
    assert learner.needs_logprob_pass(with_kl) and not learner.needs_old_logprobs(with_kl)
    assert learner.attach_logprobs(model, batch.slice(0, 4), with_kl).old_logprobs is None
    ahead = load_config(None, ["trainer.rollout_ahead=1"])
    assert torch.equal(learner.behaviour_logprobs(batch, logp, ahead), batch.sampling_logprobs)
    mini = load_config(None, ["learner.updates_per_step=2"])
    assert learner.needs_logprob_pass(mini)
    with pytest.raises(ValueError, match="updates_per_step > 1 needs old log-probs"):
        learner.behaviour_logprobs(batch, logp, mini)
    filled = learner.attach_logprobs(model, batch, mini)
    torch.testing.assert_close(filled.old_logprobs * batch.loss_mask[:, 1:], batch.sampling_logprobs)
