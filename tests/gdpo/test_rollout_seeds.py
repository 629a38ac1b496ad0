"""Per-prompt seeds: on by default on CPUs (the same samples however prompts are split), off by default on
GPUs, where a seeded request sends vLLM's sampler down its one-request-at-a-time path. The engine is a
recorder of the sampling parameters it is handed (the sampler's behaviour is vLLM's, not tested here)."""

from types import SimpleNamespace

import pytest
import torch

from gdpo import rollout
from gdpo.config import load_config


class _Engine:
    def __init__(self):
        self.params = None

    def collective_rpc(self, name):
        assert name == "gdpo_policy_state"
        return [(0, None)]  # policy version 0, no policy adapter

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.params = params
        out = SimpleNamespace(
            token_ids=[5], text="x", finish_reason="stop", logprobs=[{5: SimpleNamespace(logprob=-0.1)}]
        )
        return [SimpleNamespace(prompt_token_ids=[1], outputs=[out]) for _ in prompts]


@pytest.mark.parametrize(
    "setting, gpu, seeded", [(None, False, True), (None, True, False), (True, True, True), (False, False, False)]
)
def test_the_default_seeds_prompts_on_cpus_only(monkeypatch, setting, gpu, seeded):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = load_config(None, [] if setting is None else [f"rollout.seed_per_prompt={setting}"])
    assert rollout.seeds_per_prompt(cfg) is seeded


def test_unseeded_requests_carry_no_seed_and_seeded_ones_the_prompts_own():
    llm = _Engine()
    sampling = dict(max_new_tokens=4, temperature=1.0, seed=10)
    rollout.generate_checked(llm, 0, ["a", "b"], 1, seeded=True, **sampling)
    assert [p.seed for p in llm.params] == [10, 11]
    rollout.generate_checked(llm, 0, ["a", "b"], 1, seeded=False, **sampling)
    assert [p.seed for p in llm.params] == [None, None]
