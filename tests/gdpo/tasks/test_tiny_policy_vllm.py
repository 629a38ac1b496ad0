import os

import pytest

from gdpo import rollout
from gdpo.config import load_config
from gdpo.tasks import chain_arith
from gdpo.policy import greedy_generate
from gdpo.tasks.tiny_policy import TEMPLATE, ensure_tiny_policy


@pytest.mark.e2e
def test_vllm_serves_the_tiny_policy_like_hf():
    """vLLM (CPU) loads the built policy directory and decodes greedily what HF decodes."""
    vllm = pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = str(ensure_tiny_policy(load_config().sft))
    problems = chain_arith.problems("eval", 16, seed=5)
    prompts = [TEMPLATE.format(question=p.question) for p in problems]

    tok = AutoTokenizer.from_pretrained(path)
    hf_ids, _ = greedy_generate(AutoModelForCausalLM.from_pretrained(path).eval(), tok, prompts, 128)

    llm = rollout.make_engine(path, load_config())  # float32, eager, the model's 256-token context
    try:
        outs = llm.generate(prompts, vllm.SamplingParams(temperature=0.0, max_tokens=128))
    finally:
        rollout.close_engine(llm)
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    vllm_ids = [ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids for ids in vllm_ids]
    same = sum(a == b for a, b in zip(hf_ids, vllm_ids))
    assert same >= 15, (same, [tok.decode(x) for x in vllm_ids[:3]])
    assert all(o.outputs[0].text.rstrip().endswith("}") for o in outs)
