"""The GPU memory a run needs, estimated before Ray starts (``gdpo check-config``, ``gdpo train``).

Per learner GPU, from the model's shape and the config:

- the frozen base weights in ``model.dtype`` (ZeRO-3 partitions them over the learners and gathers about
  two layers at a time);
- DoRA adapters ``r·(in + out) + out`` per adapted projection, kept in fp32 with their fp32 gradients and
  AdamW's two moments (16 bytes a parameter; ZeRO-2 partitions the moments, ZeRO-3 everything);
- activations of one micro-batch of ``micro_batch_per_worker x (longest prompt + max_new_tokens)`` tokens
  (``learner.max_tokens_per_micro_batch`` when set, or one whole sequence if longer): what a Qwen2-style
  decoder layer saves for backward per token (below), times the layers; with activation checkpointing
  (``learner.gradient_checkpointing``) only each layer's input is kept and one layer is recomputed at a time;
- the logits: with ``learner.logprob_chunk_tokens`` (the default) one chunk's fp32 logits and one fp32
  temporary (8 bytes a chunk token and vocabulary entry, whatever the sequence length); on the naive
  path, beside the activations at the start of backward, ``tokens x vocab`` in the model's dtype, the fp32
  ``log_softmax`` kept for backward, its gradient and its input's (b + 12 bytes), and after backward, alone,
  the entropy metric's fp32 copies (16 bytes, 18 in bf16).

Per engine: ``rollout.gpu_memory_utilization`` of the GPU while awake (vLLM takes that fraction whatever
the model needs, and refuses to start where less is free); asleep through the update (``sleep_level`` >= 1)
it keeps about ``ENGINE_ASLEEP_GIB`` (its CUDA context and graph pools). Colocated, the two share one GPU in
both phases: the rollout (the learner's resident memory beside the awake engine) and the update (the
learner's peak beside the engine, asleep or not).

What a decoder layer saves per token (bytes; ``b`` = the dtype's size, ``h`` hidden, ``q = heads·head_dim``,
``k = kv_heads·head_dim``, ``I`` intermediate, ``r`` DoRA rank): two RMSNorms (their fp32 input, 4h, and
their output, b·h), the q/k/v outputs, rotary's rotated halves and rotated q/k, the attention output and its
contiguous copy (sdpa, which takes grouped k/v as they are: no [T x T] scores, no repeated k/v), o_proj's output,
the MLP's gate, up, SiLU and product (4·b·I) and down's output, and each DoRA projection's rank-r product.
``bench/bench_memory_plan.py`` checks the estimate against measured peaks at small shapes on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
ENGINE_ASLEEP_GIB = 1.0  # vLLM asleep: CUDA context, CUDA-graph pools, allocator slack
CUDA_CONTEXT_GIB = 0.5  # a process's CUDA context (each learner)
ENGINE_WORKSPACE_GIB = 1.5  # an awake engine's own: CUDA context, sampler and activation workspace
HEADROOM = 0.9  # of a GPU a plan may fill: the caching allocator's fragmentation, NCCL's buffers
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, hf_config) -> "ModelShape":
        """From a transformers config (Qwen2, Llama and their kin)."""
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            hidden=hf_config.hidden_size,
            layers=hf_config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=hf_config.intermediate_size,
            vocab=hf_config.vocab_size,
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, k, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, k),
            "v_proj": (h, k),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        q, k = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return sum(a * b for a, b in self.projections().values()) + q + 2 * k + 2 * self.hidden  # + biases, norms

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def adapter_params(self, targets, rank: int) -> int:
        shapes = self.projections()
        return self.layers * sum(rank * (i + o) + o for name, (i, o) in shapes.items() if name in targets)

    def activation_bytes_per_token(self, b: int, rank: int, targets) -> float:
        """What one decoder layer keeps for backward per token (module docstring)."""
        h, i = self.hidden, self.intermediate
        q, k = self.heads * self.head_dim, self.kv_heads * self.head_dim
        norms = 2 * (4 * h + b * h)
        qkv = b * (q + 2 * k)
        rotary = 2 * b * (q + k)
        attention = 2 * b * q + 4 * self.heads
        mlp = 4 * b * i + 2 * b * h  # gate, up, SiLU, product; o_proj's and down_proj's outputs
        dora = b * rank * sum(name in targets for name in self.projections())
        return norms + qkv + rotary + attention + mlp + dora


@dataclass(frozen=True)
class MemoryPlan:
    """Figures in GiB, per GPU."""

    gpu_gib: float | None  # the GPU's memory (None: unknown)
    tokens_per_micro_batch: int
    weights: float  # frozen base (this rank's share under ZeRO-3, plus its gathered layers)
    adapters: float  # adapter parameters, gradients and AdamW moments (this rank's share)
    activations: float  # as configured (learner.gradient_checkpointing)
    activations_checkpointed: float  # with checkpointing (each layer's input + one layer recomputed)
    logits: float  # beside the activations, at the start of backward
    entropy: float  # the entropy metric's copies, after backward (the activations gone)
    engine_awake: float  # an engine's share of a GPU while it generates
    engine_during_update: float  # what a colocated engine keeps through the update
    engine_weights: float  # the model's weights in one engine (its share under tensor parallelism)
    kv_cache_tokens: int  # tokens of KV cache left in an engine's share (0: none, or the GPU unknown)
    colocated: bool
    checkpointing: bool = False  # whether `activations` is the checkpointed figure

    @property
    def learner_resident(self) -> float:
        return CUDA_CONTEXT_GIB + self.weights + self.adapters

    @property
    def learner_peak(self) -> float:
        return self.learner_resident + max(self.activations + self.logits, self.entropy)

    @property
    def update_phase(self) -> float:
        return self.learner_peak + (self.engine_during_update if self.colocated else 0.0)

    @property
    def rollout_phase(self) -> float:
        return (self.learner_resident if self.colocated else 0.0) + self.engine_awake

    def lines(self) -> list[str]:
        gpu = _size(self.gpu_gib) if self.gpu_gib is not None else "unknown (set cluster.gpu_memory_gb)"
        out = [
            f"GPU memory: {gpu}; a micro-batch is {self.tokens_per_micro_batch:,} tokens",
            f"learner: weights {_size(self.weights)} + adapters/grads/AdamW {_size(self.adapters)} + CUDA context "
            f"{_size(CUDA_CONTEXT_GIB)} = {_size(self.learner_resident)} resident",
            f"learner: activations {_size(self.activations)} ("
            + (
                "with activation checkpointing"
                if self.checkpointing
                else f"{_size(self.activations_checkpointed)} with learner.gradient_checkpointing"
            )
            + f") + logits {_size(self.logits)} -> peak {_size(self.learner_peak)}",
        ]
        if self.gpu_gib is None:
            return out
        out.append(
            f"engine: {_size(self.engine_awake)} awake (weights {_size(self.engine_weights)}, KV cache for about "
            f"{self.kv_cache_tokens:,} tokens)"
            + (f", {_size(self.engine_during_update)} through the update" if self.colocated else "")
        )
        if self.colocated:
            out.append(
                f"one GPU, colocated: {_size(self.update_phase)} in the update, {_size(self.rollout_phase)} "
                "in the rollout"
            )
        return out


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def plan(cfg, shape: ModelShape, prompt_tokens: int, gpu_gib: float | None) -> MemoryPlan:
    """The plan of ``cfg`` (a ``gdpo.config.Config``) for a model of ``shape`` whose longest prompt has
    ``prompt_tokens`` tokens, on GPUs of ``gpu_gib``."""
    b = DTYPE_BYTES[cfg.model.dtype]
    ln, r = cfg.learner, cfg.learner.dora_rank
    world = ln.num_workers
    sequence = prompt_tokens + cfg.rollout.max_new_tokens
    budget = ln.max_tokens_per_micro_batch
    tokens = max(budget, sequence) if budget else ln.micro_batch_per_worker * sequence
    base = shape.params() * b
    adapters = shape.adapter_params(ln.target_modules, r)
    if ln.zero_stage == 3:
        weights = base / world + 2 * shape.layer_params() * b  # a rank's partition + the layers gathered
        adapter_bytes = 16 * adapters / world
    else:
        weights = base
        adapter_bytes = 8 * adapters + 8 * adapters / world  # fp32 params and gradients; moments partitioned
    per_layer = shape.activation_bytes_per_token(b, r, ln.target_modules)
    outside = b * shape.hidden * 2 + 4 * shape.hidden  # embeddings' output, the final norm
    activations = tokens * (per_layer * shape.layers + outside)
    checkpointed = tokens * (b * shape.hidden * shape.layers + 2 * per_layer + outside)
    if ln.logprob_chunk_tokens:  # one chunk's fp32 logits and one fp32 temporary (forward and backward)
        logits = min(tokens, ln.logprob_chunk_tokens) * shape.vocab * 8
        entropy = 0.0
    else:  # beside the activations, at the start of backward: the logits, the fp32 log_softmax kept for
        # backward, its gradient and its input's (b + 12 bytes); after backward, alone: the entropy's copies
        logits = tokens * shape.vocab * (b + 12)
        entropy = tokens * shape.vocab * (b + 12 + (4 if b != 4 else 0))
    awake = cfg.rollout.gpu_memory_utilization * gpu_gib if gpu_gib is not None else 0.0
    colocated = cfg.cluster.placement == "colocated"
    during = ENGINE_ASLEEP_GIB if cfg.rollout.sleep_level else awake
    tp = cfg.rollout.tensor_parallel_size
    engine_weights = base / tp / GIB
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * b / tp
    kv_room = awake - engine_weights - ENGINE_WORKSPACE_GIB
    kv_tokens = int(kv_room * GIB / kv_per_token) if kv_room > 0 else 0
    return MemoryPlan(
        gpu_gib=gpu_gib,
        tokens_per_micro_batch=tokens,
        weights=weights / GIB,
        adapters=adapter_bytes / GIB,
        activations=(checkpointed if ln.gradient_checkpointing else activations) / GIB,
        checkpointing=ln.gradient_checkpointing,
        activations_checkpointed=checkpointed / GIB,
        logits=logits / GIB,
        entropy=entropy / GIB,
        engine_awake=awake,
        engine_during_update=during,
        engine_weights=engine_weights,
        kv_cache_tokens=kv_tokens,
        colocated=colocated,
    )


def refusal(p: MemoryPlan, cfg) -> str | None:
    """Why the plan cannot fit ``HEADROOM`` of its GPUs, naming the keys to change; None if it fits (or the
    GPU is unknown)."""
    if p.gpu_gib is None:
        return None
    usable = HEADROOM * p.gpu_gib
    ln = cfg.learner
    shrink = (
        "lower learner.micro_batch_per_worker (or learner.max_tokens_per_micro_batch, rollout.max_new_tokens)"
        + ("" if ln.gradient_checkpointing else ", set learner.gradient_checkpointing=true")
        + ("" if ln.logprob_chunk_tokens else ", set learner.logprob_chunk_tokens=1024")
        + (", use learner.zero_stage=3" if ln.zero_stage == 2 and ln.num_workers > 1 else "")
    )
    if p.update_phase > usable:
        engine = ""
        if p.colocated and not cfg.rollout.sleep_level:
            engine = f"; the engine keeps {_size(p.engine_during_update)} through it: set rollout.sleep_level=1"
        return (
            f"the learner's update needs about {_size(p.update_phase)} of a {_size(p.gpu_gib)} GPU (at most "
            f"{_size(usable)} usable) "
            f"(activations {_size(p.activations)}, logits {_size(p.logits)}){engine}; {shrink}"
        )
    sequence = cfg.rollout.max_new_tokens
    if p.kv_cache_tokens < sequence:
        return (
            f"an engine's {_size(p.engine_awake)} (rollout.gpu_memory_utilization = "
            f"{cfg.rollout.gpu_memory_utilization:g} of {_size(p.gpu_gib)}) leaves KV cache for "
            f"{p.kv_cache_tokens:,} tokens beside its {_size(p.engine_weights)} of weights, not one "
            f"{sequence}-token response: raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size"
        )
    if p.colocated and p.rollout_phase > usable:
        return (
            f"the rollout needs {_size(p.rollout_phase)} of a {_size(p.gpu_gib)} GPU (at most {_size(usable)} "
            "usable): the learner keeps "
            f"{_size(p.learner_resident)} beside the engine's {_size(p.engine_awake)}; lower "
            "rollout.gpu_memory_utilization, or use cluster.placement=separate"
        )
    return None
