"""Learner: the policy with DoRA adapters inside a DeepSpeed engine; log-probs, GDPO updates, merged weights.

Plain functions over (engine, model); ``actors/learner.py`` only holds them. Loss denominators are
global (all micro-batches on all ranks), and DeepSpeed averages gradients over ranks, so each rank
scales its share by the world size: the update equals one large-batch step on one learner.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Optional

import torch

from gdpo.config import Config
from gdpo.cpu_threads import cpu_share, cpu_threads_per_worker
from gdpo import dora, logprob_head
from gdpo.logprob_head import Sampling
from gdpo.losses import Correction, entropy_from_logits, policy_loss, rollout_correction, token_logprobs
from gdpo.policy import save_tokenizer
from gdpo.records import TrainBatch, UpdateSums


def build_policy(model_path: str, cfg: Config):
    """HF model + the project's DoRA adapters on ``learner.target_modules``; only adapter weights train."""
    from gdpo.policy import load_policy

    model, tokenizer = load_policy(model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    tied = {"lm_head", "embed_tokens"} & set(cfg.learner.target_modules)
    if tied and getattr(model.config, "tie_word_embeddings", False):
        # vLLM builds a tied lm_head from embed_tokens and skips lm_head.* on load: the update would be dropped
        raise ValueError(
            f"config key 'learner.target_modules': {sorted(tied)} cannot get adapters on {model_path}, "
            "whose input and output embeddings are tied (tie_word_embeddings)"
        )
    try:
        # A's initialization is seeded from trainer.seed: without it two runs of one config (or a run and its
        # resumed twin's first run) start from different adapters, and every step after differs
        with torch.random.fork_rng():
            torch.manual_seed(cfg.trainer.seed)
            dora.apply_dora(
                model,
                list(cfg.learner.target_modules),
                cfg.learner.dora_rank,
                cfg.learner.dora_alpha,
                cfg.learner.dora_dropout,
                use_dora=cfg.learner.adapter == "dora",
            )
    except ValueError as e:
        raise ValueError(f"config key 'learner.target_modules' on {model_path}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.learner.logprob_chunk_tokens:
        logprob_head.install(model, cfg.learner.logprob_chunk_tokens)
    if cfg.learner.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def make_engine(model, cfg: Config):
    import deepspeed

    if cfg.learner.zero_stage == 3:
        # the fused DoRA forward reads its base weight: gather it with the layer
        deepspeed.utils.set_z3_leaf_modules(model, [dora.DoraLinear])
        # ZeRO-3 re-gathers a module's weights from a backward hook on its inputs; with a frozen embedding
        # the first layers' inputs need no grad, the hook never fires and their norms see empty weights
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay, betas=(0.9, 0.999))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.learner.micro_batch_per_worker,
        "gradient_accumulation_steps": 1,  # boundaries are set by hand in train_step
        "gradient_clipping": cfg.learner.grad_clip,
        "zero_optimization": {
            "stage": cfg.learner.zero_stage,
            **(
                {"stage3_param_persistence_threshold": cfg.learner.zero3_param_persistence_threshold}
                if cfg.learner.zero_stage == 3
                else {}
            ),
        },
        # bf16 mode would cast the whole module, DoRA's magnitude too: its rounding (~0.2% a row) would move
        # every synced weight off the base before any learning. The frozen base is loaded in model.dtype
        # already; the adapters stay fp32 (DoraLinear casts them to the input's dtype in its forward).
        "bf16": {"enabled": False},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine


class PlainEngine:
    """The part of DeepSpeed's engine that ``train_step`` uses, over a plain module and AdamW on its
    trainable parameters: for one process where DeepSpeed is absent (the GPU check, benchmarks).
    Gradients are clipped to ``learner.grad_clip`` as DeepSpeed does; no lr schedule, no ZeRO."""

    def __init__(self, model, cfg: Config):
        self.module, self.grad_clip = model, cfg.learner.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.grad_norm = None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass  # gradients accumulate until step()

    def backward(self, loss, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def step(self) -> None:
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # read after the step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.grad_norm


def lr_factor(cfg: Config):
    """Multiplier of learner.lr at optimizer step s: linear warm-up, then constant or cosine decay."""
    total = cfg.trainer.steps * cfg.learner.updates_per_step
    warm, floor = cfg.learner.lr_warmup_steps, cfg.learner.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.learner.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def micro_batches(
    batch: TrainBatch, micro: int, by_length: bool = True, max_tokens: int = 0
) -> list[tuple[torch.Tensor, TrainBatch]]:
    """``(rows, micro-batch)`` pairs: sequences sorted by length (longest first) so that similar lengths
    share a micro-batch, each cut to its own longest sequence. The forward then pads to the micro-batch's
    longest sequence, not the step's, while completion lengths vary severalfold within a step (verl's
    remove-padding and dynamic batch size aim at the same waste). ``max_tokens`` > 0: as many sequences as
    keep rows x the longest within that budget (one longer than it alone), so a micro-batch's memory is
    bounded whatever the lengths; else ``micro`` sequences each. The loss's denominators are global, so the
    grouping changes no term of it. ``by_length=False``: consecutive rows at the step's full width (the
    layout before, kept for bench/bench_padding.py)."""
    lengths = batch.attention_mask.sum(1)
    if not by_length:
        return [
            (torch.arange(lo, min(lo + micro, len(batch))), batch.slice(lo, lo + micro))
            for lo in range(0, len(batch), micro)
        ]
    order = torch.argsort(lengths, descending=True, stable=True)
    groups, lo = [], 0
    while lo < len(batch):
        if max_tokens:  # the first row is the longest: rows x its length is the padded size
            n = max(1, min(len(batch) - lo, max_tokens // int(lengths[order[lo]])))
        else:
            n = micro
        groups.append(order[lo : lo + n])
        lo += n
    return [(rows, batch.select(rows).trimmed(int(lengths[rows].max()))) for rows in groups]


def sampler_processing(cfg: Config) -> Sampling:
    """The distribution the rollout engines sample from and report log-probs of (``rollout.temperature``,
    ``rollout.top_p``): every log-prob the learner computes for training is of the same one."""
    return Sampling(cfg.rollout.temperature, cfg.rollout.top_p)


def next_token_logprobs(
    forward, model, ids: torch.Tensor, att: torch.Tensor, entropy: bool = False, sampling: Sampling = Sampling()
):
    """``forward(input_ids=, attention_mask=)`` (the model, or the DeepSpeed engine around it) ->
    ``([n, L-1] log-prob of token t+1 at position t, [n, L-1] entropy or None, logits or None)``, under the
    ``sampling``-processed distribution. Through the chunked head where the model has one
    (``learner.logprob_chunk_tokens``: no ``[tokens x vocab]`` tensor, the entropy comes with it); else
    from the full logits, which are returned for the caller's entropy metric (taken after backward, when
    the activations are gone)."""
    if isinstance(model.get_output_embeddings(), logprob_head.LogprobHead):
        with logprob_head.targets_for(model, ids, sampling):
            out = forward(input_ids=ids, attention_mask=att).logits[:, :-1]  # [n, L-1, 2]
        return out[..., 0], (out[..., 1] if entropy else None), None
    logits = forward(input_ids=ids, attention_mask=att).logits[:, :-1]  # [n, L-1, V]
    return token_logprobs(logits, ids[:, 1:], sampling), None, logits


@torch.no_grad()
def sequence_logprobs(
    model,
    batch: TrainBatch,
    micro: int,
    adapters: bool = True,
    max_tokens: int = 0,
    sampling: Sampling = Sampling(),
) -> torch.Tensor:
    """Log-prob of token t+1 at position t under the ``sampling``-processed policy: ``[N, L-1]``, on the
    batch's device (each micro-batch is moved to the model's); only a sequence's own positions are
    meaningful (past them: a padding token's log-prob, or 0 past its micro-batch's width). Reference =
    adapters disabled, no model copy."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1, device=batch.input_ids.device)
    try:
        for rows, mb in micro_batches(batch, micro, max_tokens=max_tokens):
            ids, att = mb.input_ids.to(device), mb.attention_mask.to(device)
            with contextlib.nullcontext() if adapters else dora.adapters_disabled(model):
                logp, _, _ = next_token_logprobs(model, model, ids, att, sampling=sampling)
            out[rows, : ids.shape[1] - 1] = logp.to(out.device)
    finally:
        model.train(was_training)
    return out


# the per-token metrics train_step sums on the device (and the correction's largest weight, a max), read
# back once per optimizer step
_DEVICE_SUMS = (
    "loss",
    "pg_loss",
    "kl_tokens",
    "clipped_tokens",
    "entropy_tokens",
    "drift_tokens",
    "mismatch_kl_tokens",
    "is_weight_tokens",
    "is_capped_tokens",
    "is_weight_max",
)


def train_step(
    engine,
    batch: TrainBatch,
    cfg: Config,
    *,
    global_tokens: float,
    global_seqs: float,
    world_size: int,
    by_length: bool = True,
) -> UpdateSums:
    """One optimizer step on this rank's share of the batch; returns this rank's metric sums."""
    sums, on_device = accumulate_gradients(
        engine,
        batch,
        cfg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        world_size=world_size,
        by_length=by_length,
    )
    engine.step()
    for name, value in zip(_DEVICE_SUMS, on_device.tolist()):  # the step's one device -> host sync
        setattr(sums, name, value)
    norm = engine.get_global_grad_norm()
    sums.grad_norm = 0.0 if norm is None else float(norm)
    return sums


def update(engine, batch: TrainBatch, cfg: Config, **denominators) -> UpdateSums:
    """``LearnerWorker.update``: one ``train_step``, then the memory it freed handed back to the GPU."""
    sums = train_step(engine, batch, cfg, **denominators)
    release_cached_memory(engine.module, cfg)
    return sums


def release_cached_memory(model, cfg: Config) -> None:
    """Engines that slept through the update (``rollout.sleep_level``) wake into the GPU memory it used, but
    PyTorch's caching allocator keeps the update's peak reserved until told to give its free blocks back:
    without this, waking vLLM runs out of memory on a GPU the two only share in time."""
    if cfg.rollout.sleep_level and device_of(model).type == "cuda":
        torch.cuda.empty_cache()


def accumulate_gradients(
    engine,
    batch: TrainBatch,
    cfg: Config,
    *,
    global_tokens: float,
    global_seqs: float,
    world_size: int,
    by_length: bool = True,
) -> tuple[UpdateSums, torch.Tensor]:
    """The forward and backward passes of one optimizer step, micro-batch by micro-batch, each moved from the
    batch's device (the driver's CPU) to the model's. Returns the counts known on the host and the
    ``[len(_DEVICE_SUMS)]`` metric sums, still on the model's device (no sync per micro-batch)."""
    alg = cfg.algorithm
    device = device_of(engine.module)
    parts = micro_batches(batch, cfg.learner.micro_batch_per_worker, by_length, cfg.learner.max_tokens_per_micro_batch)
    sums, sampling = UpdateSums(), sampler_processing(cfg)
    on_device = torch.zeros(len(_DEVICE_SUMS), device=device)
    engine.train()
    for i, (_, host_mb) in enumerate(parts):
        n_tok = float(host_mb.loss_mask[:, 1:].sum())
        sums.tokens += n_tok
        sums.forward_tokens += float(host_mb.attention_mask.sum())
        sums.padded_tokens += host_mb.attention_mask.numel()
        mb = host_mb.to(device)
        engine.set_gradient_accumulation_boundary(i == len(parts) - 1)
        logp, entropy, logits = next_token_logprobs(
            engine, engine.module, mb.input_ids, mb.attention_mask, entropy=True, sampling=sampling
        )  # [n, L-1] each
        mask = mb.loss_mask[:, 1:]  # [n, L-1]
        corr = correction_for(mb, logp, cfg)
        out = policy_loss(
            logp,
            behaviour_logprobs(mb, logp, cfg),
            mb.advantages,
            mask,
            loss_type=alg.policy_loss,
            weights=corr.weights if corr is not None and alg.rollout_correction != "none" else None,
            eps_low=alg.clip_eps_low,
            eps_high=alg.clip_eps_high,
            agg=alg.loss_agg,
            global_tokens=global_tokens,
            global_seqs=global_seqs,
            max_len=cfg.rollout.max_new_tokens,
            ref_logp=mb.ref_logprobs,
            kl_coef=alg.kl_coef,
            kl_estimator=alg.kl_estimator,
        )
        engine.backward(out.loss * world_size, scale_wrt_gas=False)
        with torch.no_grad():
            if entropy is None:  # the naive path: from the full logits, after backward
                entropy = entropy_from_logits(logits.detach(), mb.input_ids[:, 1:], sampling)
            del logits
            zero = torch.zeros((), device=device)
            drift = zero  # how far the learner's policy is from the one that sampled
            if mb.sampling_logprobs is not None:
                drift = ((logp - mb.sampling_logprobs).abs() * mask).sum()
            part = torch.stack(
                [
                    out.loss.detach().float(),
                    out.pg_loss.float(),
                    out.kl.float() * n_tok,
                    out.clip_fraction.float() * n_tok,
                    (entropy * mask).sum().float(),
                    drift.float(),
                    *(
                        (
                            corr.mismatch_kl.float(),
                            corr.weight_sum.float(),
                            corr.capped.float(),
                            corr.weight_max.float(),
                        )
                        if corr is not None
                        else (zero, zero, zero, zero)
                    ),
                ]
            )
            on_device[:-1] += part[:-1]
            on_device[-1] = torch.maximum(on_device[-1], part[-1])  # is_weight_max: a max, not a sum
    return sums, on_device


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors, for cross-rank equality checks and checkpoints."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checksum_params(model, zero_stage: int = 2) -> str:
    """sha256 of the trainable tensors, whole (gathered under ZeRO-3, where a rank holds a partition: a
    collective call) and read on the host wherever they live."""
    h = hashlib.sha256()
    with gathered(model, zero_stage):
        for n, p in sorted(adapter_state(model).items()):
            h.update(n.encode())
            h.update(p.float().cpu().numpy().tobytes())
    return h.hexdigest()


def set_cpu_threads(cfg: Config) -> int:
    """Torch threads for this learner on CPU (``learner.cpu_threads``; 0 = cores / learners); returns them."""
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_worker(cfg.learner.cpu_threads, cfg.learner.num_workers, cpu_share(cfg)))
    return torch.get_num_threads()


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: Optional[str] = None,
    listen_fd: Optional[int] = None,
) -> None:
    """Join the learners' torch.distributed world (gloo on CPU, nccl on GPU), then hand it to DeepSpeed.

    Rank 0 hosts the rendezvous store; given ``listen_fd`` (a socket it bound when it reported the
    port), it serves on that socket, so no other process can take the port in between.
    """
    import datetime

    import deepspeed
    import torch.distributed as dist

    os.environ.update(
        {
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": "0" if not torch.cuda.is_available() else str(rank % max(1, torch.cuda.device_count())),
        }
    )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(minutes=10)  # DeepSpeed's default
    extra = {"master_listen_fd": listen_fd} if listen_fd is not None else {}
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout, **extra)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the world above


def needs_old_logprobs(cfg: Config) -> bool:
    """Whether the update needs a separate pass for the proximal policy's log-probs (the learner before
    this update: the anchor of the clipped ratio and the numerator of the rollout correction).

    On-policy (``trainer.max_staleness=0``) only when a batch is split into several optimizer steps:
    later mini-batches meet moved weights; with one step, the training forward's own log-probs
    (detached) are exactly the proximal ones. With stale batches, when the rollout correction is on:
    the learner has moved on since the sampler's version, so its log-probs need a pass of their own;
    without correction the sampler's log-probs are the anchor (no pass, the mismatch uncorrected).
    """
    if cfg.trainer.max_staleness == 0:
        return cfg.learner.updates_per_step > 1
    return cfg.algorithm.rollout_correction != "none"


def needs_logprob_pass(cfg: Config) -> bool:
    return needs_old_logprobs(cfg) or cfg.algorithm.kl_coef > 0


def behaviour_logprobs(mb: TrainBatch, logp: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The denominator of the importance ratio for this micro-batch (see ``needs_old_logprobs``)."""
    if mb.old_logprobs is not None:
        return mb.old_logprobs
    if needs_old_logprobs(cfg):
        raise ValueError(
            "this update needs the proximal policy's log-probs (learner.updates_per_step > 1, or "
            "trainer.max_staleness > 0 with algorithm.rollout_correction): call attach_logprobs first"
        )
    if cfg.trainer.max_staleness:
        if mb.sampling_logprobs is None:
            raise ValueError("trainer.max_staleness > 0 needs the sampler's log-probs in the batch")
        return mb.sampling_logprobs
    return logp.detach()


def correction_for(mb: TrainBatch, logp: torch.Tensor, cfg: Config) -> Correction | None:
    """The rollout correction of this micro-batch (``algorithm.rollout_correction``): weights from the
    sampler's log-probs to the proximal policy's (the old log-probs, else this forward's, detached), and
    the mismatch metrics; None when the batch has no sampler log-probs and no correction is asked for."""
    alg = cfg.algorithm
    if mb.sampling_logprobs is None:
        if alg.rollout_correction != "none":
            raise ValueError(
                f"algorithm.rollout_correction={alg.rollout_correction} needs the sampler's log-probs in the batch"
            )
        return None
    proximal = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
    return rollout_correction(
        proximal,
        mb.sampling_logprobs,
        mb.loss_mask[:, 1:],
        alg.rollout_correction,
        alg.rollout_correction_level,
        alg.rollout_correction_cap,
    )


def attach_logprobs(model, batch: TrainBatch, cfg: Config) -> TrainBatch:
    """Old log-probs where the update needs a pass for them, and the reference's when KL is on."""
    micro, budget = cfg.learner.micro_batch_per_worker, cfg.learner.max_tokens_per_micro_batch
    sampling = sampler_processing(cfg)
    if needs_old_logprobs(cfg):
        batch.old_logprobs = sequence_logprobs(model, batch, micro, True, budget, sampling)
    if cfg.algorithm.kl_coef > 0:
        batch.ref_logprobs = sequence_logprobs(model, batch, micro, False, budget, sampling)
    return batch


def save_checkpoint(engine, model, directory: str, rank: int, zero_stage: int = 2) -> None:
    """DeepSpeed state of the trainable parameters (module, optimizer, scheduler) on every rank, without
    the frozen base model (rebuilt from ``model.path``); the adapter (peft format) from rank 0."""
    # DeepSpeed drops frozen parameters by ``named_parameters()``, which lists a tied weight once: a tied
    # lm_head (Qwen2.5's, 233M parameters) would stay in every checkpoint. List every alias instead.
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    own = engine.module_state_dict

    def trainable_state_dict(*args, **kwargs):
        sd = own(*args, **kwargs)
        return sd if sd is None else type(sd)((k, v) for k, v in sd.items() if k not in frozen)

    engine.module_state_dict = trainable_state_dict  # this engine, for this save only
    try:
        engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state", exclude_frozen_parameters=True)
    finally:
        del engine.module_state_dict
    with gathered(model, zero_stage):
        if rank == 0:
            dora.save_adapter(model, os.path.join(directory, "adapter"))


def load_checkpoint(engine, directory: str) -> None:
    """Restore what ``save_checkpoint`` wrote into an engine built from the same base model; the
    checkpoint has no frozen parameters, so the module is loaded non-strictly, then checked: every
    trainable parameter must have come from it."""

    def load_trainable(src: dict, dst) -> None:  # ZeRO-2: the module state; ZeRO-3 restores its partitions
        missing = sorted(n for n, p in dst.named_parameters() if p.requires_grad and n not in src)
        if missing:
            raise RuntimeError(
                f"checkpoint {directory} lacks {len(missing)} trainable parameters of this model, "
                f"e.g. {missing[0]} (learner.target_modules or dora_rank changed?)"
            )
        dst.load_state_dict(src, strict=False)

    path, _ = engine.load_checkpoint(
        os.path.join(directory, "deepspeed"), tag="state", load_module_strict=False, custom_load_fn=load_trainable
    )
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/deepspeed")


def gathered(model, zero_stage: int):
    """Full parameters on every rank for the duration (ZeRO-3 partitions them; collective call)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def save_final(model, tokenizer, directory: str, rank: int = 0, zero_stage: int = 2) -> None:
    """``directory/adapter`` (peft format) and ``directory/merged``: a plain HF model with DoRA merged in
    by the same math the weight sync uses. Collective under ZeRO-3; rank 0 writes."""
    with gathered(model, zero_stage):
        if rank == 0:
            _save_final(model, tokenizer, directory)


def _save_final(model, tokenizer, directory: str) -> None:
    dora.save_adapter(model, os.path.join(directory, "adapter"))
    model.save_pretrained(
        os.path.join(directory, "merged"), state_dict=dora.merged_state_dict(model), safe_serialization=True
    )
    save_tokenizer(tokenizer, os.path.join(directory, "merged"))
