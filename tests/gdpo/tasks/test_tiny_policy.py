import dataclasses
import json
import os

import pytest

from gdpo.config import SFTConfig, load_config
from gdpo.tasks.tiny_policy import ensure_tiny_policy, policy_dir


def _log(_msg):
    pass


def test_build_is_an_ordinary_hf_directory_and_cached(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = SFTConfig(
        cache_dir=str(tmp_path), steps=3, sequences_per_step=8, eval_problems=8, target_accuracy=0.0, max_steps=3
    )
    path = ensure_tiny_policy(cfg, _log)
    assert path == policy_dir(cfg) and (path / "build.json").is_file()
    conf = AutoConfig.from_pretrained(path)
    assert conf.model_type == "qwen2" and conf.hidden_size // conf.num_attention_heads >= 64
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Compute 3+4-2\n", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert tok.decode(tok("14-3=11\n\\boxed{11}")["input_ids"]) == "14-3=11\n\\boxed{11}"
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    assert ensure_tiny_policy(cfg, _log) == path  # second call reuses the cache
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    other = dataclasses.replace(cfg, seed=1)
    assert policy_dir(other) != path


def test_a_build_that_misses_its_target_stops_with_an_error_after_the_step_cap(tmp_path):
    from gdpo.tasks.tiny_policy import BuildFailed, _rounds

    cfg = SFTConfig(
        cache_dir=str(tmp_path), steps=4, sequences_per_step=4, eval_problems=4, target_accuracy=1.0, max_steps=8
    )
    assert _rounds(cfg) == [(4, cfg.lr), (2, cfg.lr / 2), (2, cfg.lr / 4)]  # 8 steps in all
    with pytest.raises(BuildFailed, match=r"after 8 steps, short of sft.target_accuracy = 100%: raise sft.max_steps"):
        ensure_tiny_policy(cfg, _log)  # four steps of a random model solve nothing
    assert not policy_dir(cfg).exists()  # nothing half-built is left where the cache looks
    assert _rounds(load_config().sft)[0] == (500, 3e-3)  # the default: one 500-step round where it reaches 95%


@pytest.mark.slow
def test_default_policy_meets_the_targets():
    """The embedded default's policy: >= 70% greedy accuracy, >= 2x the shortest solution's tokens."""
    cfg = load_config()
    path = ensure_tiny_policy(cfg.sft)
    stats = json.loads((path / "build.json").read_text())
    held_out = stats["held_out"]
    assert held_out["prompts"] >= 200
    assert held_out["accuracy"] >= 0.90, stats  # the build trains until 95% on its validation problems
    assert stats["rounds"][-1]["validation_accuracy"] >= 0.95
    assert held_out["tokens_over_floor"] >= 2.0, stats


def test_the_floor_counts_tokens_as_the_policy_writes_them(tmp_path):
    """transformers loads a qwen2-type tokenizer as Qwen2Tokenizer, whose pre-tokenizer splits numbers
    into digits; the tiny policy was trained with whole numbers as single tokens. The floor must count
    the policy's tokens (18 for a 2-step solution with a 2-digit result, not 20), and the task's
    prompts (single digits) must read the same either way."""
    from transformers import AutoTokenizer, Qwen2Config

    from gdpo.data import load_prompts
    from gdpo.preflight import add_floor_column
    from gdpo.tasks.tiny_policy import build_tokenizer

    trained = build_tokenizer(0)
    trained.save_pretrained(tmp_path)
    Qwen2Config(
        vocab_size=len(trained), hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64
    ).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    solution = "1+3=4\n4+6=10\n\\boxed{10}"
    assert len(loaded(solution, add_special_tokens=False)["input_ids"]) == 19  # the premise: digits split
    assert len(trained(solution, add_special_tokens=False)["input_ids"]) == 17

    data = load_prompts(load_config(None, ["data.eval_size=50"]).data, "eval", seed=0, tokenizer=loaded)
    add_floor_column(data, loaded, str(tmp_path))
    for text, floor in zip(data.columns["shortest_solution"], data.columns["floor_tokens"]):
        assert floor == len(trained(text, add_special_tokens=False)["input_ids"]) + 1, text
    for prompt in data.prompts:
        assert loaded(prompt)["input_ids"] == trained(prompt)["input_ids"], prompt


def test_concise_fraction_mixes_shortest_solutions_into_the_targets():
    import random

    from gdpo.tasks import chain_arith
    from gdpo.tasks.tiny_policy import _batch, build_tokenizer

    tok = build_tokenizer(0)
    probs = chain_arith.problems("train", 200, 0)
    shortest = [tok(chain_arith.shortest_solution(p), add_special_tokens=False)["input_ids"] for p in probs]

    def targets(concise):
        batch = _batch(tok, probs, random.Random(1), concise)
        return [[t for t in row.tolist() if t != -100][:-1] for row in batch["labels"]]  # without EOS

    mixed = sum(t == s for t, s in zip(targets(0.25), shortest)) / len(probs)
    assert 0.15 < mixed < 0.35  # about the share asked for (binomial, 200 draws)
    assert all(t == s for t, s in zip(targets(1.0), shortest))
    # 0 draws nothing extra: the same verbose texts as a build without the key
    rng = random.Random(1)
    before = [tok(chain_arith.verbose_solution(p, rng), add_special_tokens=False)["input_ids"] for p in probs]
    assert targets(0.0) == before
    base = dataclasses.replace(load_config().sft, concise_fraction=0.0)
    assert policy_dir(base) != policy_dir(dataclasses.replace(base, concise_fraction=0.2))
