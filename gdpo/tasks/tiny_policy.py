"""The tiny offline policy: a Qwen2-architecture causal LM trained by SFT on verbose chain arithmetic.

Everything is built here, nothing downloaded: a byte-level BPE tokenizer trained with the
``tokenizers`` library on task text, a small ``Qwen2ForCausalLM`` (head_dim 64, as vLLM's CPU
attention requires), and a seeded supervised run. The result is an ordinary HF model directory,
loaded everywhere with ``from_pretrained(path)``, exactly as a hub model or a local Qwen2.5 would be.

The build is cached under ``sft.cache_dir`` (default: the per-user cache, gdpo.paths) keyed by a hash of the SFT settings and
``BUILD_VERSION``; it is written to a temporary directory and renamed into place when complete, so
an interrupted build never leaves a half-written policy behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from gdpo.config import SFTConfig
from gdpo.fileio import atomic_write_text
from gdpo.tasks import chain_arith
from gdpo.paths import resolve_cache_dir

BUILD_VERSION = 3  # bump when the task text, tokenizer or training recipe changes
VALIDATION_SEED = 10_000  # the build's stopping criterion is measured on held-out problems of this seed
EOS = "<|endoftext|>"
TEMPLATE = "{question}\n"  # the prompt template the policy is trained with (DataConfig.template default)
MAX_POSITIONS = 256


def policy_dir(cfg: SFTConfig) -> Path:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "threads", "eval_problems")}
    if not fields["concise_fraction"]:  # the key came later: builds without it keep their cache directory
        del fields["concise_fraction"]
    key = hashlib.sha256(json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_cache_dir(cfg.cache_dir) / f"tiny-chain-arith-{key}"


def ensure_tiny_policy(cfg: SFTConfig, log: Callable[[str], None] = print) -> Path:
    """Return the cached policy directory, building it first if it is not there."""
    out = policy_dir(cfg)
    if (out / "build.json").is_file():
        log(f"tiny policy: reusing cached build {out}")
        stats = json.loads((out / "build.json").read_text())
        if "held_out" not in stats:  # built by an older gdpo, whose figures had other definitions
            stats["held_out"] = evaluate_policy(out, cfg.eval_problems, seed=cfg.seed, threads=cfg.threads)
            atomic_write_text(out / "build.json", json.dumps(stats, indent=2))
        return out
    log(f"tiny policy: building {out} (SFT, {cfg.steps} steps)")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = build_tiny_policy(cfg, tmp, log)
    (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tokenizer(seed: int):
    """Byte-level BPE (Qwen2-style) trained on task text, so numbers and task words are single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer/{seed}")
    texts = []
    for p in chain_arith.problems("train", 4000, seed):
        texts.append(TEMPLATE.format(question=p.question) + chain_arith.verbose_solution(p, rng))
    texts += [" ".join(str(i) for i in range(100))] * 4  # every number up to 99 becomes one token
    tok = Tokenizer(models.BPE())
    # numbers, words and every other character are separate pieces, so a number has the same token id
    # in the prompt and in the solution (the policy copies operands from the prompt)
    pieces = pre_tokenizers.Split(Regex(r"\d+|[A-Za-z]+|[^\dA-Za-z]"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pieces, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=None,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def build_model(cfg: SFTConfig, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    head_dim = cfg.hidden_size // cfg.num_heads
    mconf = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(mconf)


def _batch(tokenizer, problems: list, rng: random.Random, concise: float = 0.0) -> dict[str, torch.Tensor]:
    """A training batch; each target is the problem's shortest solution with probability ``concise``, else
    a verbose one (no draw at all when ``concise`` is 0, so such builds see the same texts as before)."""
    ids, labels = [], []
    for p in problems:
        prompt = tokenizer(TEMPLATE.format(question=p.question), add_special_tokens=False)["input_ids"]
        short = concise > 0 and rng.random() < concise
        text = chain_arith.shortest_solution(p) if short else chain_arith.verbose_solution(p, rng)
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),  # [B, T]
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),  # [B, T]
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),  # [B, T]
    }


def _rounds(cfg: SFTConfig) -> list[tuple[int, float]]:
    """(steps, peak lr) of each training round: ``sft.steps`` at ``sft.lr``, then ``steps/2`` at half the
    previous peak, until ``sft.max_steps``."""
    out, total, lr = [(cfg.steps, cfg.lr)], cfg.steps, cfg.lr
    while total + max(1, cfg.steps // 2) <= cfg.max_steps:
        lr /= 2
        out.append((max(1, cfg.steps // 2), lr))
        total += out[-1][0]
    return out


class BuildFailed(RuntimeError):
    """The tiny policy did not reach ``sft.target_accuracy`` within ``sft.max_steps``."""


def build_tiny_policy(cfg: SFTConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Train the tiny policy into ``out`` until its greedy accuracy on held-out validation problems
    reaches ``sft.target_accuracy`` (rounds of training, see ``_rounds``); return its build statistics.

    The validation problems are the held-out split drawn with another seed than the evaluations use.
    The first round is the whole build where it reaches the target, so a machine that got there with
    a fixed step count gets the same policy as before.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.time()
        tokenizer = build_tokenizer(cfg.seed)
        model = build_model(cfg, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
        rng = random.Random(f"sft/{cfg.seed}")
        pool = chain_arith.problems("train", cfg.max_steps * cfg.sequences_per_step, cfg.seed)
        validation = chain_arith.problems("eval", cfg.eval_problems, seed=VALIDATION_SEED + cfg.seed)
        done, history = 0, []
        for r, (steps, peak) in enumerate(_rounds(cfg)):
            warmup = max(1, cfg.steps // 20) if r == 0 else 1
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = peak  # the new schedule's base
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda s, n=steps, w=warmup: (
                    min(1.0, (s + 1) / w) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / n))))
                ),
            )
            model.train()
            loss_ema = None
            for step in range(steps):
                chunk = pool[(done + step) * cfg.sequences_per_step : (done + step + 1) * cfg.sequences_per_step]
                loss = model(**_batch(tokenizer, chunk, rng, cfg.concise_fraction)).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
                if (step + 1) % max(1, cfg.steps // 10) == 0:
                    log(f"  sft round {r + 1} step {step + 1}/{steps} loss {loss_ema:.4f} ({time.time() - t0:.0f}s)")
            done += steps
            model.eval()
            acc = greedy_accuracy(model, tokenizer, validation)
            history.append(
                {"round": r + 1, "steps": done, "peak_lr": peak, "loss": loss_ema, "validation_accuracy": acc}
            )
            log(f"  sft after {done} steps: validation greedy accuracy {acc:.3f} (target {cfg.target_accuracy})")
            if acc >= cfg.target_accuracy:
                break
        else:
            raise BuildFailed(
                f"the tiny policy reached {acc:.1%} greedy validation accuracy after {done} steps, short "
                f"of sft.target_accuracy = {cfg.target_accuracy:.0%}: raise sft.max_steps or lower "
                f"sft.target_accuracy (rounds: {history})"
            )
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        train_s = time.time() - t0
        metrics = evaluate_policy(out, cfg.eval_problems, seed=cfg.seed)
        return {
            "params": n_params,
            "train_seconds": round(train_s, 1),
            "steps": done,
            "rounds": history,
            "final_loss": loss_ema,
            "held_out": metrics,  # greedy, sft.eval_problems held-out problems of the evaluations' seed
        }
    finally:
        torch.set_num_threads(threads)


def greedy_accuracy(model, tokenizer, problems: list) -> float:
    """Share of ``problems`` the model answers correctly by greedy decoding (the build's criterion)."""
    from gdpo.policy import greedy_generate

    prompts = [TEMPLATE.format(question=p.question) for p in problems]
    ids, _ = greedy_generate(model, tokenizer, prompts, max_new_tokens=128)
    correct = _correct(prompts, tokenizer.batch_decode(ids, skip_special_tokens=True), problems)
    return sum(correct) / len(problems)


def _correct(prompts: list[str], texts: list[str], problems: list) -> list[bool]:
    from gdpo.eval.metrics import is_correct
    from rewards import BoundReward

    scores = BoundReward.from_name("accuracy").score(prompts, texts, {"answer": [str(p.answer) for p in problems]})
    return [is_correct(c) for c in scores]


def evaluate_policy(
    path: Path | str, n_problems: int, seed: int = 0, max_new_tokens: int = 128, threads: Optional[int] = None
) -> dict:
    """The held-out figures (``gdpo.eval.metrics.held_out_metrics``: accuracy, tokens, the floor) of a
    chain-arithmetic policy, greedy, on ``n_problems`` held-out problems of ``seed``: the same figures a
    training run's baseline reports for the same problems."""
    from gdpo.eval.metrics import held_out_metrics
    from gdpo.policy import completion_token_counts, greedy_generate, load_policy
    from gdpo.preflight import floor_tokens

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_policy(str(path))
    model.eval()
    probs = chain_arith.problems("eval", n_problems, seed)
    prompts = [TEMPLATE.format(question=p.question) for p in probs]
    ids, reasons = greedy_generate(model, tokenizer, prompts, max_new_tokens)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    shortest = [chain_arith.shortest_solution(p) for p in probs]
    return held_out_metrics(
        _correct(prompts, texts, probs),
        completion_token_counts(ids, reasons),
        [r == "length" for r in reasons],
        list(range(len(probs))),
        texts,
        floors=floor_tokens(shortest, tokenizer, str(path)),
        shortest=shortest,
    )
