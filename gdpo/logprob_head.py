"""Token log-probs and entropy from the final hidden states, a chunk of tokens at a time. Pure torch.

The naive path materializes the ``[tokens x vocab]`` logits, copies them to fp32, keeps an fp32
``log_softmax`` for backward and takes another for the entropy metric: at Qwen2.5's 151,936-token
vocabulary each fp32 copy is 0.6 GB per thousand tokens. Here the output projection, its log-sum-exp,
the target token's logit and the entropy are computed for ``chunk`` tokens at a time, and backward
recomputes each chunk's logits from the saved hidden states instead of keeping them: memory that grows
with the vocabulary is one chunk's ``[chunk x vocab]`` fp32 logits (and their gradient in backward),
whatever the sequence length. The same math as ``gdpo.losses.token_logprobs`` / ``entropy_from_logits``:

    log p(y_t) = z_t[y_t] - logsumexp(z_t),   H_t = logsumexp(z_t) - Σ_v softmax(z_t)_v · z_t,v
    ∂ log p(y_t) / ∂z_t = onehot(y_t) - softmax(z_t),   z_t = W h_t

The entropy is a metric and carries no gradient. Liger-Kernel's fused linear cross-entropy and verl's
chunked entropy/log-prob computation do the same job for the same reason.

**The sampler's distribution.** The rollout engine samples from processed logits: divided by the
temperature, then cut to the nucleus (top-p), and it reports the log-probs of that distribution
(vLLM's ``logprobs_mode="processed_logprobs"``). :class:`Sampling` makes the learner compute the same
one: ``z = W h / T``, then every logit below the nucleus floor masked out, the floor found as vLLM's
``apply_top_k_top_p_pytorch`` finds it (sort ascending, softmax, cumulative sum; tokens whose cumulative
mass is <= 1 - p are out, the most likely one always stays). The gradient is that of the processed
log-prob: ``(onehot(y_t) - softmax(z_t)) / T`` over the kept tokens, 0 elsewhere. Deviations: the token
being scored always counts as kept (a learner whose nucleus lost the sampled token by a rounding at
the boundary would get log 0); logits tied with the floor are all kept (vLLM keeps them by sort order).

:class:`LogprobHead` puts it inside the model: the output layer (``lm_head``, tied or not) changes class
in place, so the weight keeps its name, its tying and its place under DeepSpeed (ZeRO-3 gathers the
weight for the module's forward and again for its backward). Given targets (:func:`targets_for`), its
forward returns ``[..., 2]`` per position (log-prob of the target, entropy) instead of logits; without,
it is the plain linear layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Sampling:
    """The logit processing of the distribution the sampler drew from (``rollout.temperature``,
    ``rollout.top_p``); the default is the raw policy."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def raw(self) -> bool:
        return self.temperature == 1.0 and self.top_p == 1.0


SORT_ROWS = 128  # rows sorted at once for the nucleus floor: [rows x vocab] values and indices


@torch.no_grad()
def nucleus_floor(z: Tensor, top_p: float) -> Tensor:
    """``[c, V] -> [c]``: the smallest logit that top-p keeps in each row (vLLM's rule, see the module
    docstring), ``SORT_ROWS`` rows at a time; a constant to the gradient (the mask is piecewise constant)."""
    floor = z.new_empty(z.shape[0])
    for lo in range(0, z.shape[0], SORT_ROWS):
        s = z[lo : lo + SORT_ROWS].sort(dim=-1).values  # ascending
        mass = s.softmax(dim=-1).cumsum_(dim=-1)
        n_out = (mass <= 1 - top_p).sum(-1).clamp_(max=z.shape[-1] - 1)  # the tail cut off
        floor[lo : lo + SORT_ROWS] = s.gather(-1, n_out[:, None]).squeeze(-1)
        del s, mass
    return floor


def process_logits(z: Tensor, targets: Tensor, sampling: Sampling, floor: Tensor | None = None) -> Tensor | None:
    """``[c, V]`` fp32 logits made the sampler's processed logits, in place: ``z / T``, and below the
    nucleus floor ``-inf`` (each row's target kept). Returns the ``[c]`` floor used (None without top-p);
    passing it back in (``floor``) skips the sort."""
    if sampling.temperature != 1.0:
        z.div_(sampling.temperature)
    if sampling.top_p < 1.0:
        if floor is None:
            floor = nucleus_floor(z, sampling.top_p)
        out = (z < floor[:, None]).scatter_(-1, targets[:, None], False)  # [c, V] bool
        z.masked_fill_(out, float("-inf"))
    return floor


def chunked_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, sampling: Sampling = Sampling()
) -> tuple[Tensor, Tensor]:
    """``[T, D], [V, D], [T] -> ([T], [T])`` fp32 log-probs of ``targets`` (differentiable in ``hidden``
    and ``weight``) and entropies (no gradient) under the ``sampling``-processed distribution, ``chunk``
    tokens at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    return _ChunkedLogprobs.apply(hidden, weight, targets, chunk, sampling)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, sampling):  # hidden [T, D], weight [V, D], targets [T]
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)  # [T]
        entropy = torch.empty_like(logp)  # [T]
        lse = torch.empty_like(logp)  # [T] kept for backward: the softmax without another reduction
        floor = torch.empty_like(logp) if sampling.top_p < 1.0 else None  # [T] kept: no sort in backward
        for lo in range(0, n, chunk):
            tgt = targets[lo : lo + chunk]
            z = F.linear(hidden[lo : lo + chunk], weight).float()  # [c, V]
            rows_floor = process_logits(z, tgt, sampling)
            if floor is not None:
                floor[lo : lo + chunk] = rows_floor
            m = torch.logsumexp(z, dim=-1)  # [c]
            lse[lo : lo + chunk] = m
            logp[lo : lo + chunk] = z.gather(-1, tgt[:, None]).squeeze(-1) - m
            z.sub_(m[:, None]).clamp_(min=torch.finfo(z.dtype).min)  # log p, in place; -inf -> finite: 0·log 0 = 0
            entropy[lo : lo + chunk] = -z.exp().mul_(z).sum(-1)  # one [c, V] temporary beside z
            del z
        ctx.save_for_backward(hidden, weight, targets, lse, floor)
        ctx.chunk, ctx.sampling = chunk, sampling
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):  # grad_logp [T]
        hidden, weight, targets, lse, floor = ctx.saved_tensors
        sampling = ctx.sampling
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        for lo in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[lo : lo + ctx.chunk]
            g = grad_logp[lo : lo + ctx.chunk].float() / sampling.temperature  # [c]: ∂(z/T)/∂z = 1/T
            tgt = targets[lo : lo + ctx.chunk]
            rows_floor = None if floor is None else floor[lo : lo + ctx.chunk]
            z = F.linear(h, weight).float()  # [c, V] recomputed
            process_logits(z, tgt, sampling, rows_floor)
            z.sub_(lse[lo : lo + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g · softmax (0 outside the nucleus)
            z.scatter_add_(-1, tgt[:, None], g[:, None])  # + g · onehot
            dz = z.to(hidden.dtype)  # [c, V]
            if need_h:
                grad_h[lo : lo + ctx.chunk] = dz @ weight
            if need_w:
                grad_w.addmm_(dz.T.float(), h.float())
            del z, dz
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


class LogprobHead(nn.Linear):
    """The model's output layer (``nn.Linear``, its class swapped in place by :func:`install`): with
    ``targets`` set it returns ``[..., 2]`` (log-prob of each position's target, entropy) through
    :func:`chunked_logprobs`; without, logits as before."""

    targets: Tensor | None = None  # [..., L] the token each position predicts (set by targets_for)
    sampling: Sampling = Sampling()  # the distribution scored (set by targets_for)
    chunk: int = 1024

    def forward(self, hidden: Tensor) -> Tensor:  # [..., L, D]
        if self.targets is None:
            return super().forward(hidden)
        lead = hidden.shape[:-1]
        if self.targets.shape != lead:
            raise ValueError(f"targets {tuple(self.targets.shape)} do not match the hidden states {tuple(lead)}")
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
        logp, entropy = chunked_logprobs(flat, self.weight, self.targets.reshape(-1), self.chunk, self.sampling)
        return torch.stack([logp, entropy], dim=-1).reshape(*lead, 2)


def install(model: nn.Module, chunk: int) -> LogprobHead:
    """Make ``model``'s output embeddings a :class:`LogprobHead` (the same module object and weight)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"chunked log-probs need a bias-free nn.Linear output layer, got {type(head).__name__}")
    if not isinstance(head, LogprobHead):
        head.__class__ = LogprobHead
    head.chunk = chunk
    return head


@contextlib.contextmanager
def targets_for(model: nn.Module, input_ids: Tensor, sampling: Sampling = Sampling()):
    """Within: the model's forward returns ``[n, L, 2]`` (log-prob of token t+1 at position t, entropy,
    under the ``sampling``-processed distribution) in place of logits; the last position predicts nothing
    (its target is a dummy, its values meaningless). ``[n, L]`` input ids."""
    head = model.get_output_embeddings()
    if not isinstance(head, LogprobHead):
        raise TypeError("the model's output layer is not a LogprobHead: call gdpo.logprob_head.install first")
    head.targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # [n, L]; the last one a dummy
    head.sampling = sampling
    try:
        yield head
    finally:
        head.targets, head.sampling = None, Sampling()
