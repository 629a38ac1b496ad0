"""Where the policy comes from: every model path goes through ``from_pretrained``."""

from __future__ import annotations

from typing import Callable

from gdpo.config import BUILTIN_TINY_POLICY, Config


def resolve_model_path(cfg: Config, log: Callable[[str], None] = print) -> str:
    """The HF directory or hub id of the policy; the builtin tiny policy is built (or reused) here."""
    if cfg.model.path == BUILTIN_TINY_POLICY:
        from gdpo.tasks.tiny_policy import ensure_tiny_policy

        return str(ensure_tiny_policy(cfg.sft, log))
    return cfg.model.path


def load_policy(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from an HF directory or hub id — the same code for the tiny policy and Qwen2.5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model, tokenizer
