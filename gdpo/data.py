"""Prompt datasets: project tasks, JSONL files and HF datasets, filled into a prompt template.

Source specs (``data.train`` / ``data.eval``):
- ``task:NAME``: a project task (``gdpo.tasks``); train and eval are disjoint splits.
- ``path/to/file.jsonl``: one JSON object per line.
- ``hf:NAME[:CONFIG]:SPLIT``: ``datasets.load_dataset`` (a hub id or a local dataset directory).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gdpo.config import DataConfig
from gdpo.tasks import task_rows

TASK_DEFAULT_SIZE = {"train": 50_000, "eval": 200}


class DataError(ValueError):
    """Bad data: the message names the file, the line or sample index, and the column."""


@dataclass
class PromptSet:
    prompts: list[str]  # [P] filled templates, ready for the tokenizer
    columns: dict[str, list]  # column -> [P] values (always includes "answer")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: list[int]) -> "PromptSet":
        return PromptSet([self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()})


def load_rows(spec: str, role: str, limit: int = 0, seed: int = 0) -> list[dict]:
    """Rows of a source spec; ``role`` is "train" or "eval" (the split of a task); ``limit`` 0 = all."""
    if spec.startswith("task:"):
        n = limit or TASK_DEFAULT_SIZE[role]
        try:
            return task_rows(spec[len("task:") :], role, n, seed)
        except ValueError as err:
            raise DataError(f"data source '{spec}': {err}") from err
    if spec.startswith("hf:"):
        rows = _hf_rows(spec)
    else:
        rows = _jsonl_rows(Path(spec))
    return rows[:limit] if limit else rows


def _jsonl_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"data file {path}: cannot read it ({err.strerror})") from None
    for lineno, data in enumerate(raw.split(b"\n"), 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows


def _hf_rows(spec: str) -> list[dict]:
    parts = spec[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"data source '{spec}' must look like 'hf:NAME:SPLIT' or 'hf:NAME:CONFIG:SPLIT'")
    import datasets

    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as err:  # noqa: BLE001 - unreachable hub, unknown name/config/split: the spec is named
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"data source '{spec}': cannot load it ({type(err).__name__}: {first})") from None


def template_fields(template: str) -> list[str]:
    """The ``{column}`` names of a template; a malformed template or a field that is not a plain column
    name (``{q.attr}``, ``{q[0]}``, a positional ``{}``) is a ``DataError`` naming data.template."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise DataError(f"data.template {template!r}: {err} (a literal brace is written {{{{ or }}}})") from None
    for f in fields:
        if not f.isidentifier():
            raise DataError(f"data.template {template!r}: {{{f}}} is not a column name (use {{column}})")
    return fields


def check_golds(golds: list[str], source: str) -> None:
    """Gold answers the accuracy reward can judge as meant: none empty; GSM8K-style solutions carry
    their final answer (``#### N``) on every row, since without it math-verify takes the solution's
    last number (often not the answer); a multi-line solution text needs a marked final answer."""
    for i, gold in enumerate(golds):
        if not gold.strip():
            raise DataError(f"data source '{source}': sample {i} has an empty gold answer")
    marked = sum("####" in g for g in golds)
    if 0 < marked < len(golds):
        i = next(i for i, g in enumerate(golds) if "####" not in g)
        raise DataError(
            f"data source '{source}': sample {i}'s gold answer has no '#### N' final answer, while "
            f"{marked} of {len(golds)} samples do; without it the accuracy reward would judge against "
            "the solution's last number. Fix or drop such rows"
        )
    for i, gold in enumerate(golds):
        if "\n" in gold.strip() and "####" not in gold and "\\boxed" not in gold:
            raise DataError(
                f"data source '{source}': sample {i}'s gold answer is a multi-line text without a "
                "final answer ('#### N' or \\boxed{..}); the accuracy reward would judge against its "
                "last number"
            )


def build_prompts(rows: list[dict], cfg: DataConfig, source: str, tokenizer=None) -> PromptSet:
    """Fill the template from each row; checks every needed column before any work starts."""
    needed = set(template_fields(cfg.template)) | {cfg.answer_column}
    for i, row in enumerate(rows):
        missing = sorted(needed - set(row))
        if missing:
            raise DataError(
                f"data source '{source}': sample {i} has no column {missing[0]!r} "
                f"(columns: {', '.join(sorted(row))}; see data.template / data.answer_column)"
            )
    prompts = [cfg.template.format(**{k: row[k] for k in template_fields(cfg.template)}) for row in rows]
    if cfg.use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.use_chat_template is true but the tokenizer has no chat template")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    columns = {k: [row[k] for row in rows] for k in rows[0] if all(k in r for r in rows)}
    columns["answer"] = [str(row[cfg.answer_column]) for row in rows]
    check_golds(columns["answer"], source)
    return PromptSet(prompts, columns)


def load_prompts(cfg: DataConfig, role: str, seed: int = 0, tokenizer=None, limit: Optional[int] = None) -> PromptSet:
    spec = cfg.train if role == "train" else cfg.eval
    size = cfg.train_size if role == "train" else cfg.eval_size
    rows = load_rows(spec, role, size if limit is None else limit, seed)
    return build_prompts(rows, cfg, spec, tokenizer)
