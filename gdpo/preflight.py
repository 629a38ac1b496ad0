"""What a run needs that can be checked without workers, loaded and checked before Ray starts.

The model path resolves and its tokenizer loads; both data sources load and fill the prompt
template (and the tokenizer's chat template with ``data.use_chat_template``); every prompt plus
``rollout.max_new_tokens`` fits the engines' context; the run fits its GPUs' memory
(``gdpo.memory_plan``, where the GPU memory is known). Each failure names the config key, the file
or the sample, and comes before any actor, engine or DeepSpeed rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gdpo.config import Config, ConfigError
from gdpo.data import DataError, PromptSet, load_prompts


MODEL_KEY = "config key 'model.path' ="


@dataclass
class RunInputs:
    model_path: str  # the HF directory (or hub id) every worker loads
    train: PromptSet
    eval: PromptSet
    context: int  # the engines' max_model_len: prompt + completion tokens
    longest_prompt: int  # tokens, over both sources


def model_context(model_path: str, cfg: Config) -> int:
    """The engines' context: ``rollout.max_model_len``, else the model's ``max_position_embeddings``."""
    from transformers import AutoConfig

    limit = getattr(
        AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code),
        "max_position_embeddings",
        None,
    )
    wanted = cfg.rollout.max_model_len
    if wanted is not None and limit is not None and wanted > limit:
        raise ConfigError(
            f"config key 'rollout.max_model_len' = {wanted} exceeds the model's context "
            f"(max_position_embeddings = {limit} in {model_path})"
        )
    if wanted is None and limit is None:
        raise ConfigError(f"the model in {model_path} states no max_position_embeddings: set rollout.max_model_len")
    return wanted if wanted is not None else limit


def check_prompt_lengths(
    prompts: list[str],
    tokenizer,
    context: int,
    max_new_tokens: int,
    source: str,
    new_tokens_key: str = "rollout.max_new_tokens",
) -> int:
    """The longest prompt in tokens; an error naming the sample when a prompt plus ``max_new_tokens``
    does not fit ``context`` (vLLM would refuse that request in the middle of a run)."""
    for i, p in enumerate(prompts):  # tokens are seldom 64 characters long: refused without tokenizing it
        if len(p) > 64 * context:
            raise ConfigError(
                f"data source '{source}': sample {i} has a prompt of {len(p):,} characters, far past "
                f"the engines' context of {context} tokens; filter the data"
            )
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    worst = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[worst] + max_new_tokens > context:
        too_long = sum(n + max_new_tokens > context for n in lengths)
        raise ConfigError(
            f"data source '{source}': sample {worst} has a {lengths[worst]}-token prompt; with "
            f"{new_tokens_key} = {max_new_tokens} it exceeds the engines' context of {context} tokens "
            f"({too_long} of {len(lengths)} prompts do). Raise rollout.max_model_len (up to the model's "
            f"max_position_embeddings), lower {new_tokens_key}, or filter the data"
        )
    return lengths[worst]


def add_floor_column(data: PromptSet, tokenizer, model_path: str) -> None:
    """Where the data has each problem's ``shortest_solution``, a ``floor_tokens`` column: its length in
    the tokens the policy writes, EOS included (as completion lengths count it). Rewards and evaluations
    read it. The count comes from the model's own ``tokenizer.json`` where it has one (see
    ``solution_encoder``)."""
    shortest = data.columns.get("shortest_solution")
    if shortest:
        data.columns["floor_tokens"] = floor_tokens(shortest, tokenizer, model_path)


def floor_tokens(shortest: list[str], tokenizer, model_path: str) -> list[int]:
    """Each shortest solution's length in the policy's tokens, EOS included (as completions count it)."""
    encode = solution_encoder(model_path, tokenizer)
    return [len(encode(text)) + 1 for text in shortest]


def solution_encoder(model_path: str, tokenizer) -> Callable[[str], list[int]]:
    """Token ids of a completion text as the model was trained to write it: the model directory's
    ``tokenizer.json`` read as it is. transformers 5 loads a qwen2-type model's tokenizer as
    ``Qwen2Tokenizer``, which replaces the file's pre-tokenizer with Qwen2's own (numbers split into
    digits); for a Qwen2 checkpoint the two agree, but the project's tiny policy writes whole numbers
    as one token, so counting with the loaded tokenizer would put its floor above its own solutions."""
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(path))
        return lambda text: raw.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(model_path: str, cfg: Config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"config key 'model.path' = {model_path!r}: no tokenizer could be loaded from it "
            f"({str(err).strip().splitlines()[0]})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_run(cfg: Config, log: Callable[[str], None] = print) -> RunInputs:
    """Resolve and check everything above; the trainer hands the result to the workers."""
    from gdpo.policy import resolve_model_path

    return _prepare(cfg, resolve_model_path(cfg.model.path, cfg.sft, log, what=MODEL_KEY), log)


def check_run(cfg: Config, log: Callable[[str], None] = print) -> None:
    """``gdpo check-config``: the same checks as ``prepare_run`` without building the builtin tiny
    policy (minutes) when it is not cached yet; then only what needs no model is checked (the data,
    the templates, the rewards' fields)."""
    from gdpo.config import BUILTIN_TINY_POLICY
    from gdpo.policy import resolve_model_path
    from gdpo.tasks.tiny_policy import policy_dir

    if cfg.model.path == BUILTIN_TINY_POLICY and not (policy_dir(cfg.sft) / "build.json").is_file():
        log("the builtin tiny policy is not built yet (gdpo train builds it): model and context checks skipped")
        for role, seed in (("train", cfg.trainer.seed), ("eval", cfg.data.eval_seed)):
            try:
                data = load_prompts(cfg.data, role, seed=seed)
            except DataError as err:
                raise DataError(f"data.{role}: {err}") from None
            check_reward_fields(cfg, data, role)
        return
    _prepare(cfg, resolve_model_path(cfg.model.path, cfg.sft, log, build=False, what=MODEL_KEY), log, plan_always=True)


def gpu_memory_gib(cfg: Config) -> float | None:
    """``cluster.gpu_memory_gb``, else this machine's first GPU, else None."""
    if cfg.cluster.gpu_memory_gb is not None:
        return cfg.cluster.gpu_memory_gb
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return None


def check_memory(cfg: Config, model_path: str, prompt_tokens: int, log: Callable[[str], None], always: bool = False):
    """The memory plan (``gdpo.memory_plan``) of this run: logged where the GPU memory is known (or
    ``always``), and a ConfigError naming the keys to change where it cannot fit. Returns it."""
    from transformers import AutoConfig

    from gdpo import memory_plan

    gpu = gpu_memory_gib(cfg)
    if gpu is None and not always:
        return None
    hf = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    plan = memory_plan.plan(cfg, memory_plan.ModelShape.of(hf), prompt_tokens, gpu)
    for line in plan.lines():
        log(f"memory plan: {line}")
    why = memory_plan.refusal(plan, cfg)
    if why is not None:
        raise ConfigError(f"memory plan: {why}")
    return plan


def _prepare(cfg: Config, model_path: str, log: Callable[[str], None] = print, plan_always: bool = False) -> RunInputs:
    tokenizer = load_tokenizer(model_path, cfg)
    context = model_context(model_path, cfg)
    sets, longest = {}, 0
    for role, source, seed in (
        ("train", cfg.data.train, cfg.trainer.seed),
        ("eval", cfg.data.eval, cfg.data.eval_seed),
    ):
        try:
            sets[role] = load_prompts(cfg.data, role, seed=seed, tokenizer=tokenizer)
        except DataError as err:
            raise DataError(f"data.{role}: {err}") from None
        longest = max(
            longest, check_prompt_lengths(sets[role].prompts, tokenizer, context, cfg.rollout.max_new_tokens, source)
        )
        add_floor_column(sets[role], tokenizer, model_path)
        check_reward_fields(cfg, sets[role], role)
    check_memory(cfg, model_path, longest, log, always=plan_always)
    return RunInputs(model_path, sets["train"], sets["eval"], context, longest)


def check_reward_fields(cfg: Config, data: PromptSet, role: str) -> None:
    """Every reward's required fields are among the data's columns and the scorer's own fields."""
    from rewards import BoundReward, RewardError

    names = set(data.columns) | {"completion_token_counts", "group_ids", "rewards"}
    for k, (name, kwargs) in enumerate(cfg.rewards.specs()):
        try:
            BoundReward.from_name(name, kwargs).check_fields(names | set(kwargs))
        except RewardError as err:
            raise ConfigError(f"config key 'rewards.functions.{k}' with data.{role}: {err}") from None
