"""Chunked log-probs and entropy equal the naive ``[tokens x vocab]`` path: values, gradients in the hidden
states and the output weight, and inside a real (tiny) Qwen2 policy with tied embeddings and DoRA adapters."""

import pytest
import torch

from gdpo import learner, logprob_head
from gdpo.config import load_config
from gdpo.losses import entropy_from_logits, token_logprobs


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_values_and_gradients_equal_the_naive_path(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (50,), generator=g)
    upstream = torch.randn(50, generator=g)

    logits = hidden @ weight.T  # [T, V]
    ref_logp = token_logprobs(logits[None], targets[None])[0]
    ref_ent = entropy_from_logits(logits.detach()[None])[0]
    ref_gh, ref_gw = torch.autograd.grad((ref_logp * upstream).sum(), (hidden, weight))

    logp, ent = logprob_head.chunked_logprobs(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert logp.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)


def test_a_frozen_weight_gets_no_gradient_and_bf16_hidden_states_keep_their_dtype():
    hidden = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.bfloat16)
    logp, _ = logprob_head.chunked_logprobs(hidden, weight, torch.randint(0, 20, (9,)), 4)
    logp.sum().backward()
    assert logp.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16 and weight.grad is None


@pytest.fixture
def policy(tmp_path):
    from tests.gdpo.test_learner_zero import _fixed_batch
    from tests.helpers.chat_model import build_chat_model

    cfg = load_config(None, ["learner.micro_batch_per_worker=8"])
    model, tok = learner.build_policy(str(build_chat_model(tmp_path / "m")), cfg)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data += 0.02 * torch.randn_like(p)  # adapters away from their zero start
    return model, _fixed_batch(tok)


def test_inside_the_policy_with_tied_embeddings_log_probs_entropy_and_adapter_gradients_agree(policy):
    model, batch = policy
    assert model.config.tie_word_embeddings
    ids, att, mask = batch.input_ids, batch.attention_mask, batch.loss_mask[:, 1:]
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    ref_logp = token_logprobs(logits, ids[:, 1:])
    ref_ent = entropy_from_logits(logits.detach())
    adapters = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad((ref_logp * mask).sum(), adapters)

    head = logprob_head.install(model, chunk=5)
    assert head is model.lm_head and head.weight is model.model.embed_tokens.weight  # still tied
    with logprob_head.targets_for(model, ids):
        out = model(input_ids=ids, attention_mask=att).logits[:, :-1]  # [n, L-1, 2]
    logp, ent = out[..., 0], out[..., 1]
    grads = torch.autograd.grad((logp * mask).sum(), adapters)
    real = att[:, 1:] > 0
    torch.testing.assert_close(logp[real], ref_logp[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[real], ref_ent[real], atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert model(input_ids=ids, attention_mask=att).logits.shape[-1] == model.config.vocab_size  # logits again


def test_the_update_through_the_chunked_head_equals_the_full_logits_one(tmp_path):
    import copy

    from tests.gdpo.test_learner_zero import _fixed_batch
    from tests.gdpo.test_micro_batches import _Recording
    from tests.helpers.chat_model import build_chat_model

    path = str(build_chat_model(tmp_path / "m"))
    results = []
    for chunk in (0, 6):
        cfg = load_config(None, ["learner.micro_batch_per_worker=3", f"learner.logprob_chunk_tokens={chunk}"])
        model, tok = learner.build_policy(path, cfg)
        assert isinstance(model.lm_head, logprob_head.LogprobHead) is bool(chunk)
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data += 0.02 * torch.randn_like(p)
        batch = _fixed_batch(tok)
        engine = _Recording(copy.deepcopy(model), cfg)
        sums = learner.train_step(
            engine, batch, cfg, global_tokens=float(batch.loss_mask[:, 1:].sum()), global_seqs=8.0, world_size=1
        )
        results.append((sums, engine.grads))
    (full, w_full), (chunked, w_chunked) = results
    assert chunked.loss == pytest.approx(full.loss, abs=1e-6)
    assert chunked.entropy_tokens == pytest.approx(full.entropy_tokens, rel=1e-5)
    assert chunked.drift_tokens == pytest.approx(full.drift_tokens, rel=1e-5)
    assert chunked.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    for a, b in zip(w_full, w_chunked):  # the same gradients (AdamW's first step would magnify float noise)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk", [3, 64])
def test_the_processed_distribution_chunked_equals_the_full_logits_one(chunk):
    """Temperature and top-p through the chunked head: the same log-probs, entropies and gradients as the
    full logits processed at once (``gdpo.losses.token_logprobs`` with the same ``Sampling``)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=g).requires_grad_()
    weight = (torch.randn(200, 16, generator=g) * 0.7).requires_grad_()
    targets = torch.randint(0, 200, (40,), generator=g)
    upstream = torch.randn(40, generator=g)
    sampling = logprob_head.Sampling(0.7, 0.9)

    logits = hidden @ weight.T
    ref_logp = token_logprobs(logits[None], targets[None], sampling)[0]
    ref_ent = entropy_from_logits(logits.detach()[None], targets[None], sampling)[0]
    ref_grads = torch.autograd.grad((ref_logp * upstream).sum(), (hidden, weight))
    logp, ent = logprob_head.chunked_logprobs(hidden, weight, targets, chunk, sampling)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    raw = token_logprobs(logits[None], targets[None])[0]
    assert (logp - raw).abs().max() > 0.1  # processing changes the figures the test compares


def test_the_nucleus_is_vllms_and_the_scored_token_always_stays_in_it():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g) * 3
    sampling = logprob_head.Sampling(0.7, 0.9)
    z = logits / 0.7
    vllm_z = apply_top_k_top_p_pytorch(z.clone(), None, torch.full((64,), 0.9))  # -inf outside the nucleus
    vllm_logp = vllm_z.log_softmax(-1)
    inside = torch.stack([torch.multinomial(vllm_logp[i].exp(), 1, generator=g)[0] for i in range(64)])
    ours = token_logprobs(logits[None], inside[None], sampling)[0]
    torch.testing.assert_close(ours, vllm_logp.gather(-1, inside[:, None]).squeeze(-1), atol=1e-6, rtol=0)
    kept = torch.isfinite(vllm_z)
    assert 1 < kept.sum(-1).float().mean() < 400  # the nucleus cuts, and keeps more than one token
    outside = (~kept).float().argmax(-1)  # a token vLLM's nucleus drops: scored anyway, as if kept
    got = token_logprobs(logits[None], outside[None], sampling)[0]
    assert torch.isfinite(got).all() and (got < vllm_logp.max(-1).values).all()
