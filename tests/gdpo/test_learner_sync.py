"""Learner pieces without Ray or DeepSpeed: the importance-ratio denominator (``_adapted_lm`` also
serves the weight-sync tests)."""

import pytest
import torch

from gdpo import dora, learner
from gdpo.config import load_config
from gdpo.losses import token_logprobs
from gdpo.records import TrainBatch


def _adapted_lm(seed=0, dtype=torch.float32, use_dora=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype)
    dora.apply_dora(model, ["q_proj", "v_proj", "down_proj"], 4, 8.0, use_dora=use_dora)
    for p in model.parameters():
        if p.requires_grad:
            p.data += 0.1 * torch.randn_like(p)  # B != 0: merged weights differ from the base
    return model


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
    stale = load_config(None, ["trainer.max_staleness=1", "algorithm.rollout_correction=none", "algorithm.kl_coef=0"])
    assert torch.equal(learner.behaviour_logprobs(batch, logp, stale), batch.sampling_logprobs)
    assert not learner.needs_logprob_pass(stale)  # uncorrected: the sampler's log-probs anchor the ratio
    corrected = load_config(None, ["trainer.max_staleness=2", "algorithm.rollout_correction=tis"])
    assert learner.needs_old_logprobs(corrected)  # the learner moved on since sampling: a pass for its own
    with pytest.raises(ValueError, match="call attach_logprobs first"):
        learner.behaviour_logprobs(batch, logp, corrected)
    mini = load_config(None, ["learner.updates_per_step=2"])
    assert learner.needs_logprob_pass(mini)
    with pytest.raises(ValueError, match="call attach_logprobs first"):
        learner.behaviour_logprobs(batch, logp, mini)
    filled = learner.attach_logprobs(model, batch, mini)
    torch.testing.assert_close(filled.old_logprobs * batch.loss_mask[:, 1:], batch.sampling_logprobs)


def test_adapters_on_tied_embeddings_are_refused():
    """vLLM builds a tied lm_head from embed_tokens and skips lm_head.* when it loads: an adapter there would
    train, and never reach the engine."""
    from gdpo.policy import resolve_model_path

    cfg = load_config(None, ["learner.target_modules=[q_proj, lm_head]"])
    with pytest.raises(ValueError, match=r"learner.target_modules.*\['lm_head'\].*tied"):
        learner.build_policy(resolve_model_path(cfg.model.path, cfg.sft, log=lambda m: None), cfg)
