"""Where the policy comes from: every model path goes through ``from_pretrained``.

``resolve_model_path`` is the one place a user's model path becomes the directory every process
loads: ``gdpo train model.path=...``, ``gdpo eval --model``, ``gdpo compress --model`` and ``gdpo
compare`` all accept the same forms, and a wrong one fails before any work starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from gdpo.config import BUILTIN_TINY_POLICY, ConfigError, SFTConfig

# "name" or "org/name": what the hub accepts as a model id; anything else is a local path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelPathError(ConfigError):
    """A model path that names neither a model directory, a run, nor a hub id."""


def resolve_model_path(
    path: str, sft: SFTConfig, log: Callable[[str], None] = print, build: bool = True, what: str = "model path"
) -> str:
    """The HF directory (or hub id) to load for ``path``.

    Accepted forms: ``builtin:tiny-chain-arith`` (the project's tiny policy, built and cached here
    unless ``build`` is false), an HF model directory (has ``config.json``), a training run's
    ``final/`` or the run directory itself (their ``merged/`` model), or a hub id (``org/name``)
    that is not a local path. ``what`` names the setting in errors (``"config key 'model.path'"``,
    ``"--model"``).
    """
    if path == BUILTIN_TINY_POLICY:
        from gdpo.tasks.tiny_policy import ensure_tiny_policy, policy_dir

        return str(ensure_tiny_policy(sft, log) if build else policy_dir(sft))
    p = Path(path).expanduser()
    for cand in (p, p / "merged", p / "final" / "merged"):
        if _is_model_dir(cand):
            return str(cand)
    if p.exists():
        raise ModelPathError(
            f"{what} {path}: not an HF model directory (no config.json), nor a run directory or a run's "
            "final/ (no merged/config.json)"
        )
    if _HUB_ID.fullmatch(path) and not path.startswith((".", "~")):
        return path  # a hub id: from_pretrained fetches (or finds in its cache) the model
    raise ModelPathError(f"{what} {path}: no such directory (and not a hub id of the form org/name)")


def _is_model_dir(path: Path) -> bool:
    """An HF model directory: its ``config.json`` names a ``model_type`` (a run directory's
    ``config.json`` is gdpo's own config, which does not)."""
    from gdpo.fileio import read_json_object

    try:
        return "model_type" in read_json_object(path / "config.json")
    except ValueError:
        return False


def load_policy(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from an HF directory or hub id — the same code for the tiny policy and Qwen2.5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model, tokenizer


def greedy_generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64
) -> tuple[list[list[int]], list[str]]:
    """Greedy decoding with HF ``generate`` (left padding): per prompt the completion's token ids (without
    the EOS) and its finish reason, ``"stop"`` (EOS reached) or ``"length"``.

    Counted as vLLM counts completion tokens, a stopped completion is ``len(ids) + 1`` tokens long (the
    EOS); ``completion_token_counts`` does that.
    """
    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, reasons = [], []
    with torch.no_grad():
        for lo in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[lo : lo + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                stopped = tokenizer.eos_token_id in row
                ids.append(row[: row.index(tokenizer.eos_token_id)] if stopped else row)
                reasons.append("stop" if stopped else "length")
    return ids, reasons


def completion_token_counts(ids: list[list[int]], reasons: list[str]) -> list[int]:
    """Completion lengths as vLLM reports them: the EOS of a stopped completion counts."""
    return [len(x) + (reason == "stop") for x, reason in zip(ids, reasons)]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Write the tokenizer beside a saved model as the model was trained with it: the files of the
    directory it was loaded from, copied as they are. transformers 5 loads a qwen2-type tokenizer as
    ``Qwen2Tokenizer`` and its ``save_pretrained`` writes Qwen2's pre-tokenizer (digits split) in place
    of the file's own, so a saved copy of the project's tiny policy would tokenize numbers differently
    from the policy it holds. A tokenizer from the hub (no local directory) is saved by transformers."""
    import shutil

    src, out = Path(tokenizer.name_or_path), Path(out_dir)
    if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    else:
        tokenizer.save_pretrained(out)
