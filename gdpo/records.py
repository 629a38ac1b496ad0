"""Typed records passed between the driver and the actors (no dicts of lists across the wire)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor


@dataclass
class UpdateSums:
    """One learner rank's sums over its share of one optimizer step; ranks add up with ``+``."""

    loss: float = 0.0  # the rank's loss (already scaled by the global denominators)
    pg_loss: float = 0.0
    kl_tokens: float = 0.0  # per-token KL x tokens
    clipped_tokens: float = 0.0  # tokens whose importance ratio was clipped
    entropy_tokens: float = 0.0
    tokens: float = 0.0  # completion (loss) tokens
    forward_tokens: float = 0.0  # every token through the forward pass, padding excluded
    padded_tokens: float = 0.0  # every position through the forward pass, padding included
    drift_tokens: float = 0.0  # |learner - sampler| log-prob x tokens
    mismatch_kl_tokens: float = 0.0  # k3 estimate of KL(sampler ‖ learner before the update) x tokens
    is_weight_tokens: float = 0.0  # the rollout correction's weights applied, summed over tokens
    is_capped_tokens: float = 0.0  # tokens whose weight passed the cap (TIS: truncated, MIS: masked)
    is_weight_max: float = 0.0  # the largest weight before the cap: a max over ranks, not a sum
    grad_norm: float = 0.0  # the clipped global norm: the same on every rank, so not added

    def __add__(self, other: "UpdateSums") -> "UpdateSums":
        out = UpdateSums(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})
        out.grad_norm = self.grad_norm
        out.is_weight_max = max(self.is_weight_max, other.is_weight_max)
        return out


@dataclass(frozen=True)
class UpdateStats:
    """What one step's update reports (a ``metrics.jsonl`` row's learner columns)."""

    loss: float  # mean over the step's optimizer steps
    kl: float  # per completion token
    clip_ratio: float  # share of completion tokens clipped
    entropy: float  # per completion token
    grad_norm: float  # mean over the optimizer steps
    logprob_drift: float  # before the first optimizer step: learner vs sampler, per token
    mismatch_kl: float  # before the first optimizer step: KL(sampler ‖ learner), k3, per token
    is_weight_mean: float  # the rollout correction's weights applied, per token (1 = none)
    is_weight_max: float  # the largest weight before the cap
    is_capped_frac: float  # share of tokens whose weight passed the cap (TIS: truncated, MIS: masked)
    forward_tokens: float
    padding_frac: float  # share of the training forward's positions that were padding

    @classmethod
    def from_sums(cls, per_step: list[UpdateSums]) -> "UpdateStats":
        """From each optimizer step's sums over all ranks (``learner.updates_per_step`` of them)."""
        total = per_step[0]
        for s in per_step[1:]:
            total = total + s
        tok = max(total.tokens, 1.0)
        return cls(
            loss=total.loss / len(per_step),
            kl=total.kl_tokens / tok,
            clip_ratio=total.clipped_tokens / tok,
            entropy=total.entropy_tokens / tok,
            grad_norm=sum(s.grad_norm for s in per_step) / len(per_step),
            logprob_drift=per_step[0].drift_tokens / max(per_step[0].tokens, 1.0),
            mismatch_kl=per_step[0].mismatch_kl_tokens / max(per_step[0].tokens, 1.0),
            is_weight_mean=total.is_weight_tokens / tok,
            is_weight_max=max(s.is_weight_max for s in per_step),
            is_capped_frac=total.is_capped_tokens / tok,
            forward_tokens=total.forward_tokens,
            padding_frac=1.0 - total.forward_tokens / max(total.padded_tokens, 1.0),
        )

    def row(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SamplingSettings:
    """How the engines sample one call's completions (``gdpo.rollout.generate``'s keyword arguments)."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    min_new_tokens: int = 0

    @classmethod
    def for_rollout(cls, cfg) -> "SamplingSettings":
        """The training rollouts' settings (``rollout.*``)."""
        r = cfg.rollout
        return cls(r.max_new_tokens, r.temperature, r.top_p, r.min_new_tokens)

    @classmethod
    def for_held_out(cls, cfg) -> "SamplingSettings":
        """The trainer's held-out evaluations: ``rollout.eval_temperature`` (greedy by default), no nucleus."""
        return cls(cfg.rollout.max_new_tokens, cfg.rollout.eval_temperature)

    def kwargs(self, seed: int) -> dict:
        return {**asdict(self), "seed": seed}


@dataclass
class RolloutBatch:
    """Completions of one step: ``samples_per_prompt`` contiguous samples per prompt."""

    prompt_ids: list[list[int]]  # [N][P_i] prompt tokens of each sample (repeated within a group)
    completion_ids: list[list[int]]  # [N][T_i] generated tokens (EOS included when the model stopped)
    completions: list[str]  # [N] decoded completion text
    finish_reasons: list[str]  # [N] "stop" (EOS) or "length" (hit max_new_tokens)
    sampling_logprobs: list[list[float]]  # [N][T_i] log-prob of each sampled token under the sampler
    group_ids: list[int]  # [N] index of the prompt within the step
    policy_version: int  # weights version the samples were drawn from
    seconds: float = 0.0  # wall time of the generation inside the engine (parts: the slowest)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def completion_token_counts(self) -> list[int]:  # [N]
        return [len(c) for c in self.completion_ids]

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        versions = {p.policy_version for p in parts}
        if len(versions) != 1:
            raise ValueError(f"rollout parts come from different policy versions: {sorted(versions)}")
        offset, group_ids = 0, []
        for p in parts:
            group_ids += [g + offset for g in p.group_ids]
            offset += (max(p.group_ids) + 1) if p.group_ids else 0
        return RolloutBatch(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            completion_ids=[x for p in parts for x in p.completion_ids],
            completions=[x for p in parts for x in p.completions],
            finish_reasons=[x for p in parts for x in p.finish_reasons],
            sampling_logprobs=[x for p in parts for x in p.sampling_logprobs],
            group_ids=group_ids,
            policy_version=versions.pop(),
            seconds=max((p.seconds for p in parts), default=0.0),
        )


@dataclass
class TrainBatch:
    """Padded tensors for the learner; position t of ``loss_mask`` marks token t as a completion token."""

    input_ids: Tensor  # [N, L] prompt + completion, right-padded
    attention_mask: Tensor  # [N, L]
    loss_mask: Tensor  # [N, L] 1 where the token is a completion token
    advantages: Tensor  # [N]
    old_logprobs: Tensor | None = None  # [N, L-1] log-prob of token t+1 under the sampling policy
    ref_logprobs: Tensor | None = None  # [N, L-1] same under the reference (adapters off)
    sampling_logprobs: Tensor | None = None  # [N, L-1] same as reported by the rollout engine (0 off-completion)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index) -> "TrainBatch":
        """Rows ``index`` (a slice or an index tensor) of every field."""
        return TrainBatch(*(None if t is None else t[index] for t in self._fields()))

    def slice(self, lo: int, hi: int) -> "TrainBatch":
        return self.select(slice(lo, hi))

    def to(self, device) -> "TrainBatch":
        """Every field on ``device``: the driver builds batches on its CPU, the learner's model may be on a
        GPU (DeepSpeed's forward does not move its inputs)."""
        return TrainBatch(*(None if t is None else t.to(device) for t in self._fields()))

    def _fields(self) -> tuple:
        return (
            self.input_ids,
            self.attention_mask,
            self.loss_mask,
            self.advantages,
            self.old_logprobs,
            self.ref_logprobs,
            self.sampling_logprobs,
        )

    def trimmed(self, width: int) -> "TrainBatch":
        """The first ``width`` positions: right padding past every row's end dropped (nothing else changes:
        attention is causal, so no kept position saw the dropped ones)."""
        per_token = (self.old_logprobs, self.ref_logprobs, self.sampling_logprobs)
        return TrainBatch(
            self.input_ids[:, :width],
            self.attention_mask[:, :width],
            self.loss_mask[:, :width],
            self.advantages,
            *(None if t is None else t[:, : width - 1] for t in per_token),
        )

    @staticmethod
    def concat(parts: list["TrainBatch"]) -> "TrainBatch":
        """Rejoin shards cut from one batch by ``slice`` (same width)."""

        def cat(name):
            ts = [getattr(p, name) for p in parts]
            return None if any(t is None for t in ts) else torch.cat(ts)

        return TrainBatch(
            *(
                cat(f)
                for f in (
                    "input_ids",
                    "attention_mask",
                    "loss_mask",
                    "advantages",
                    "old_logprobs",
                    "ref_logprobs",
                    "sampling_logprobs",
                )
            )
        )

    @staticmethod
    def from_rollouts(batch: RolloutBatch, advantages: Tensor, pad_id: int) -> "TrainBatch":
        seqs = [p + c for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        width = max(map(len, seqs))
        n = len(seqs)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        loss_mask = torch.zeros((n, width), dtype=torch.float32)
        sampling = torch.zeros((n, width - 1), dtype=torch.float32)
        for i, (p, c, lp) in enumerate(zip(batch.prompt_ids, batch.completion_ids, batch.sampling_logprobs)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            loss_mask[i, len(p) : len(p) + len(c)] = 1.0
            sampling[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(lp, dtype=torch.float32)
        return TrainBatch(input_ids, attention, loss_mask, advantages.float(), sampling_logprobs=sampling)


@dataclass
class WeightUpdate:
    """A published policy version (what learner rank 0 reports after sending it)."""

    version: int
    num_bytes: int  # payload: the file's size, or the tensors' bytes when only broadcast
    names: list[str] = field(default_factory=list)  # checkpoint-format tensor names, in send order
    path: str | None = None  # the weight file on learner 0's node (file transport), None if not written
    checksum: str = ""  # sha256 of the file's bytes
    broadcast: bool = False  # whether it was also sent to the collective group
    adapter: bool = False  # a LoRA adapter (path: a peft adapter directory), not merged weights


@dataclass(frozen=True)
class SyncGroup:
    """How the ranks of one broadcast group meet: learner rank 0 is rank 0, engine i's workers follow
    at ``rank_offset_i + worker rank``. One group per epoch; a new epoch gets a new port and tag."""

    backend: str  # "gloo" (CPU) or "nccl" (GPU)
    host: str  # learner rank 0's node IP, where rank 0 hosts the store
    port: int
    world_size: int  # 1 + the workers of every engine in the group
    tag: str  # unique per group: keys in the store and log lines
    timeout_s: float  # joining and every collective call fail after this
    bucket_bytes: int
    manifest: list  # [(name, dtype, shape)] in send order (gdpo.weight_sync.manifest_of)
    adapter_config: str | None = None  # an adapter sync: the adapter_config.json the engines write beside it


@dataclass
class SyncReport:
    """One sync as the driver saw it."""

    version: int
    num_bytes: int  # payload bytes of the version
    publish_s: float  # learners computing and sending (the broadcast included)
    load_s: float  # file engines loading after the publish
    file_engines: int  # engines that took the file / the broadcast
    collective_engines: int
