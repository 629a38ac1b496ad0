"""Rollout generation with vLLM: engine construction, sampling, weight loading, scoring log-probs.

Plain functions over a ``vllm.LLM``; the Ray actor in ``actors/rollout.py`` only holds the engine.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from gdpo.config import Config
from gdpo.cpu_threads import cpu_share, cpu_threads_per_worker
from gdpo.records import RolloutBatch
from gdpo.weight_sync import POLICY_LORA_ID, POLICY_LORA_NAME, TORN

EXTENSION = "gdpo.vllm_ext.WeightSyncExtension"


LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


ENGINE_SETTINGS = (
    "kv_cache_gib",
    "cpu_reserved_cores",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "in_process",
    "cpu_threads",
    "sleep_level",
)


def engine_settings(cfg: Config) -> dict:
    """The settings ``make_engine`` reads: two engines with equal settings serve a checkpoint alike."""
    return {
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        **{k: getattr(cfg.rollout, k) for k in ENGINE_SETTINGS},
    }


def make_engine(model_path: str, cfg: Config, seed: int = 0, lora_rank: int = 0):
    """A vLLM engine for the policy, with the weight-sync worker extension mixed in; ``lora_rank`` > 0
    enables serving one LoRA adapter of at most that rank.

    In-process (``rollout.in_process``, the CPU default) the engine lives in this process: it takes
    ``rollout.cpu_threads`` torch threads, and vLLM seeds this process's global random generators with
    ``seed``; close it with :func:`close_engine`."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    if cfg.rollout.cpu_reserved_cores is not None:  # read by the engine-core process vLLM starts below
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.rollout.cpu_reserved_cores)
    import torch
    import vllm

    from gdpo.preflight import model_context

    lora = {}
    if lora_rank:
        fits = [r for r in LORA_RANKS if r >= lora_rank]
        if not fits:
            raise ValueError(f"LoRA rank {lora_rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
        lora = {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": 1}
    gpu = torch.cuda.is_available()
    in_process = cfg.rollout.in_process if cfg.rollout.in_process is not None else not gpu
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if in_process and not gpu:  # the engine's OpenMP threads are this process's
        torch._C.set_num_threads(
            cpu_threads_per_worker(cfg.rollout.cpu_threads, cfg.rollout.num_workers, cpu_share(cfg))
        )
    if hasattr(vllm.envs.__getattr__, "cache_clear"):  # a previous engine froze vLLM's view of the environment
        vllm.envs.disable_envs_cache()
    eager = cfg.rollout.enforce_eager if cfg.rollout.enforce_eager is not None else not gpu
    extra = {"enable_sleep_mode": True} if gpu and cfg.rollout.sleep_level else {}  # vLLM refuses it on CPU
    if gpu and cfg.rollout.tensor_parallel_size > 1:  # its own processes on the GPUs this actor holds: inside a
        extra["distributed_executor_backend"] = "mp"  # placement group vLLM would pick Ray and wait for free GPUs
    try:
        return vllm.LLM(
            model=model_path,
            dtype=cfg.model.dtype,
            seed=seed,
            trust_remote_code=cfg.model.trust_remote_code,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            max_model_len=model_context(model_path, cfg),
            enforce_eager=eager,
            worker_extension_cls=EXTENSION,
            # the log-probs of the distribution sampled from (after temperature and top-p), the behaviour
            # policy's, which the learner reproduces (gdpo.logprob_head.Sampling); vLLM's default is raw
            logprobs_mode="processed_logprobs",
            **extra,
            **lora,
        )
    finally:  # vLLM's CPU worker swaps in a no-op for it in its process, here the caller's: undone
        torch.set_num_threads = torch._C.set_num_threads


_LORA_IDS: dict[tuple[str, int], int] = {}


def lora_id(path: str) -> int:
    """vLLM caches an adapter by its integer id: each adapter directory (and each rewrite of it) gets its
    own, so one engine can serve several adapters in turn without serving a cached one in another's place."""
    weights = os.path.join(path, "adapter_model.safetensors")
    key = (os.path.realpath(path), os.stat(weights).st_mtime_ns if os.path.exists(weights) else 0)
    return _LORA_IDS.setdefault(key, len(_LORA_IDS) + 1)


def close_engine(llm) -> None:
    """Stop the engine's processes now. Left to the garbage collector, vLLM's finalizer stops them at
    some later point, logging to whatever stream was current when it was set up."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def seeds_per_prompt(cfg: Config) -> bool:
    """``rollout.seed_per_prompt`` resolved where the engine runs (None: on CPUs only)."""
    import torch

    return cfg.rollout.seed_per_prompt if cfg.rollout.seed_per_prompt is not None else not torch.cuda.is_available()


def generate(
    llm,
    prompts: list[str],
    samples_per_prompt: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: Optional[int] = 0,
    policy_version: int = 0,
    lora_path: Optional[str] = None,
    min_new_tokens: int = 0,
    lora_request=None,
) -> RolloutBatch:
    """``samples_per_prompt`` completions per prompt, grouped contiguously; prompt i is seeded ``seed + i``
    (``seed`` None: no per-request seeds, the engine's generator samples the batch at once).
    ``lora_path``: a LoRA adapter directory (peft layout) applied on top of the engine's weights;
    ``lora_request``: a ``LoRARequest`` the engine holds already (the policy's, :func:`policy_lora`)."""
    import vllm

    params = [
        vllm.SamplingParams(
            n=samples_per_prompt,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            logprobs=0,
            seed=None if seed is None else seed + i,
        )
        for i in range(len(prompts))
    ]
    lora = lora_request
    if lora_path:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(f"adapter-{lora_id(lora_path)}", lora_id(lora_path), lora_path)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    batch = RolloutBatch([], [], [], [], [], [], policy_version, seconds=time.perf_counter() - t0)
    for g, out in enumerate(outs):
        for comp in out.outputs:
            ids = list(comp.token_ids)
            batch.prompt_ids.append(list(out.prompt_token_ids))
            batch.completion_ids.append(ids)
            batch.completions.append(comp.text)
            batch.finish_reasons.append("length" if comp.finish_reason == "length" else "stop")
            batch.sampling_logprobs.append([lp[t].logprob for t, lp in zip(ids, comp.logprobs)])
            batch.group_ids.append(g)
    return batch


def sequence_logprobs(llm, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
    """Log-prob of each completion token given its prompt, under the engine's current policy (its weights,
    and its policy adapter when an adapter sync put one there)."""
    import vllm
    from vllm.inputs import TokensPrompt

    reqs = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, completion_ids)]
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outs = llm.generate(reqs, params, use_tqdm=False, lora_request=policy_lora(engine_state(llm)[1]))
    result = []
    for out, p, c in zip(outs, prompt_ids, completion_ids):
        plp = out.prompt_logprobs  # [P + T] entries, the first None
        result.append([plp[len(p) + j][tok].logprob for j, tok in enumerate(c)])
    return result


def sleep(llm, level: int) -> None:
    """Free the engine's GPU memory for the learner's update (vLLM sleep mode; level 1 keeps the
    weights in CPU memory, level 2 drops them). vLLM's CPU backend only pauses the engine."""
    llm.sleep(level=level)


def wake(llm, level: int) -> None:
    """Undo ``sleep``; after level 2 the base weights are reloaded from the model path and the engine
    counts as torn until the next sync brings the policy (a sync sends only the adapted layers)."""
    llm.wake_up()
    if level == 2:
        from gdpo.weight_sync import engine_reload_base

        engine_reload_base(llm)


def engine_state(llm) -> tuple[int, Optional[str]]:
    """(policy version, the policy adapter's directory or None) that every worker of the engine holds."""
    states = llm.collective_rpc("gdpo_policy_state")
    versions = {v for v, _ in states}
    if len(versions) != 1:
        raise RuntimeError(f"rollout engine workers disagree on the policy version: {sorted(versions)}")
    if len({a is None for _, a in states}) != 1:  # each worker writes a broadcast adapter to its own directory
        raise RuntimeError(f"rollout engine workers disagree on serving a policy adapter: {states}")
    return states[0]


def engine_version(llm) -> int:
    return engine_state(llm)[0]


def policy_lora(path: Optional[str]):
    """The request that samples with the policy adapter an adapter sync loaded (None: no adapter). The engine
    holds it already under this id; the path is read again only if vLLM evicted it."""
    if path is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(POLICY_LORA_NAME, POLICY_LORA_ID, path)


class StalePolicyError(RuntimeError):
    """The engine holds another policy version than the driver expects."""


def generate_checked(
    llm, expected_version: int, prompts: list[str], samples_per_prompt: int, seeded: bool = True, **sampling
) -> RolloutBatch:
    """``generate`` after checking that the engine holds ``expected_version`` (never sample a stale policy);
    ``seeded`` False drops the per-prompt seeds (``seeds_per_prompt``)."""
    if not seeded:
        sampling["seed"] = None
    held, adapter = engine_state(llm)
    if held == TORN:
        raise StalePolicyError(
            f"rollout engine holds a torn policy (a weight load failed part way), the driver "
            f"expects version {expected_version}"
        )
    if held != expected_version:
        raise StalePolicyError(f"rollout engine holds policy version {held}, the driver expects {expected_version}")
    return generate(
        llm, prompts, samples_per_prompt, policy_version=held, lora_request=policy_lora(adapter), **sampling
    )
