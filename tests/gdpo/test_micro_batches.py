"""Length-sorted, trimmed micro-batches: the learner's forward skips the step's padding and computes the
same log-probs, loss and gradients as one micro-batch of the whole step."""

import copy

import pytest
import torch

from gdpo import learner
from gdpo.config import load_config
from tests.gdpo.test_learner_zero import _fixed_batch
from tests.helpers.chat_model import build_chat_model


class _Recording(learner.PlainEngine):
    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]
        super().step()


def _policy(tmp_path):
    cfg = load_config(None, ["learner.micro_batch_per_worker=2"])
    model, tok = learner.build_policy(str(build_chat_model(tmp_path / "m")), cfg)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data += 0.02 * torch.randn_like(p)  # adapters away from their zero start
    return cfg, model, tok


def test_micro_batches_cover_every_row_once_grouped_by_length_and_trimmed(tmp_path):
    _, _, tok = _policy(tmp_path)
    batch = _fixed_batch(tok)
    lengths = batch.attention_mask.sum(1)
    parts = learner.micro_batches(batch, 3)
    rows = torch.cat([r for r, _ in parts])
    assert sorted(rows.tolist()) == list(range(len(batch)))
    assert [len(r) for r, _ in parts] == [3, 3, 2]
    widths = [mb.input_ids.shape[1] for _, mb in parts]
    assert widths == sorted(widths, reverse=True) and widths[-1] < batch.input_ids.shape[1]
    for r, mb in parts:
        assert mb.input_ids.shape[1] == int(lengths[r].max())
        assert torch.equal(mb.input_ids, batch.input_ids[r, : mb.input_ids.shape[1]])
        assert torch.equal(mb.sampling_logprobs, batch.sampling_logprobs[r, : mb.input_ids.shape[1] - 1])
        assert mb.loss_mask.sum() == batch.loss_mask[r].sum()  # nothing of a completion was cut


def test_trimmed_micro_batches_give_the_whole_steps_logprobs_loss_and_gradients(tmp_path):
    cfg, model, tok = _policy(tmp_path)
    batch = _fixed_batch(tok)
    mask = batch.loss_mask[:, 1:] > 0
    whole = learner.sequence_logprobs(model, batch, micro=len(batch))
    parts = learner.sequence_logprobs(model, batch, micro=2)
    assert torch.allclose(parts[mask], whole[mask], atol=1e-5)

    denominators = dict(global_tokens=float(mask.sum()), global_seqs=float(len(batch)), world_size=1)
    one = load_config(None, [f"learner.micro_batch_per_worker={len(batch)}"])
    engines, sums = [], []
    for c in (one, cfg):
        engine = _Recording(copy.deepcopy(model), c)
        sums.append(learner.train_step(engine, batch, c, **denominators))
        engines.append(engine)
    assert abs(sums[0].loss - sums[1].loss) < 1e-5 and sums[0].tokens == sums[1].tokens
    for a, b in zip(*(e.grads for e in engines)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    assert sums[0].forward_tokens == sums[1].forward_tokens  # the same real tokens ...
    assert sums[1].padded_tokens < sums[0].padded_tokens  # ... through fewer padded positions
    assert sums[0].padded_tokens == batch.input_ids.numel()


def test_a_token_budget_packs_rows_under_it_and_gives_a_longer_sequence_its_own(tmp_path):
    _, _, tok = _policy(tmp_path)
    batch = _fixed_batch(tok)
    lengths = batch.attention_mask.sum(1)
    budget = int(lengths.max()) * 2 + 1  # two of the longest fit, and more of the shorter ones
    parts = learner.micro_batches(batch, 1, max_tokens=budget)
    rows = torch.cat([r for r, _ in parts])
    assert sorted(rows.tolist()) == list(range(len(batch)))  # every row once
    assert all(len(r) * mb.input_ids.shape[1] <= budget for r, mb in parts)  # padded size within the budget
    assert len(parts[0][0]) == 2  # two of the longest
    for r, mb in parts[:-1]:  # each is full: one more row would pass the budget at its width
        assert (len(r) + 1) * mb.input_ids.shape[1] > budget
    tight = learner.micro_batches(batch, 1, max_tokens=int(lengths.max()) - 1)  # below the longest sequence
    assert [len(r) for r, _ in tight][0] == 1 and sorted(torch.cat([r for r, _ in tight]).tolist()) == list(range(8))


def test_a_token_budget_leaves_the_loss_and_gradients_unchanged(tmp_path):
    cfg, model, tok = _policy(tmp_path)
    batch = _fixed_batch(tok)
    denominators = dict(global_tokens=float(batch.loss_mask[:, 1:].sum()), global_seqs=float(len(batch)), world_size=1)
    by_count = load_config(None, [f"learner.micro_batch_per_worker={len(batch)}"])
    by_budget = load_config(None, ["learner.max_tokens_per_micro_batch=40"])
    grads, losses = [], []
    for c in (by_count, by_budget):
        engine = _Recording(copy.deepcopy(model), c)
        losses.append(learner.train_step(engine, batch, c, **denominators).loss)
        grads.append(engine.grads)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    batch = None
    grads = []
    for on in (False, True):
        cfg = load_config(None, [f"learner.gradient_checkpointing={str(on).lower()}"])
        model, tok = learner.build_policy(str(build_chat_model(tmp_path / "m")), cfg)
        assert model.is_gradient_checkpointing is on
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data += 0.02 * torch.randn_like(p)
        batch = batch or _fixed_batch(tok)
        engine = _Recording(model, cfg)
        learner.train_step(
            engine, batch, cfg, global_tokens=float(batch.loss_mask[:, 1:].sum()), global_seqs=8.0, world_size=1
        )
        grads.append(engine.grads)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
