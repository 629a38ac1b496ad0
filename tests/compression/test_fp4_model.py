"""Whole-model quantization on a small random Qwen2: block-sequential calibration, packed save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compression.calib import CalibrationError, block_groups, capture_inputs, target_linears
from compression.fp4.model import load_quantized, quantize_model, save_quantized, shared_input_sets
from compression.fp4.qlinear import QuantEmbedding, QuantLinear
from compression.fp4.search import QuantSetting, SearchGrid

GRID = SearchGrid(points=12, act_points=6, rounds=1)


def _model(tie=True, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _batches(n=6, width=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, width), generator=g)
        mask = torch.ones(4, width, dtype=torch.long)
        mask[1, width // 2 :] = 0  # a padded row: its padding must not be calibrated on
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_targets_groups_and_shared_inputs():
    m = _model()
    names = target_linears(m)
    assert "lm_head" not in names and len(names) == 14
    assert target_linears(m, lm_head=True)[-1] == "lm_head"
    assert target_linears(m, ["q_proj", "down_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    groups = block_groups(target_linears(m, lm_head=True))
    assert [len(g) for g in groups] == [7, 7, 1]
    xs = capture_inputs(m, groups[0], _batches())
    assert xs[groups[0][0]].shape == (6 * (3 * 20 + 10), 32)  # real tokens only
    assert [len(s) for s in shared_input_sets(groups[0], xs)] == [3, 1, 2, 1]  # qkv, o, gate+up, down
    with pytest.raises(CalibrationError, match="no linear layer matches.*q_proj"):
        target_linears(m, ["query"])


@pytest.mark.parametrize("method", ["search", "minmax_int"])
def test_saved_checkpoint_loads_back_to_the_same_model(tmp_path, method):
    m = _model()
    ids = _batches(1, seed=9)[0]
    with torch.no_grad():
        full = m(**ids).logits
    quant = quantize_model(m, _batches(), QuantSetting.parse("w4a4"), method, GRID, log=lambda s: None)
    with torch.no_grad():
        q_logits = m(**ids).logits
    assert not torch.allclose(q_logits, full)  # quantization changed something
    assert sum(isinstance(mod, QuantLinear) for mod in m.modules()) == 14
    path = save_quantized(m, quant, str(tmp_path / "q"))
    assert not list(tmp_path.glob("q.tmp-*"))
    tensors = load_file(str(path / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.qweight"]
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)  # [out, in/2]: two 4-bit codes a byte
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    meta = json.loads((path / "quantization.json").read_text())
    assert meta["setting"] == "w4a4" and meta["method"] == method and len(meta["layers"]) == 14
    back = load_quantized(str(path))
    with torch.no_grad():
        assert torch.equal(back(**ids).logits, q_logits)
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(back.get_submodule(name).weight, mod.weight)


def test_lm_head_and_embedding_untie_and_quantize(tmp_path):
    m = _model(tie=True)
    emb_before = m.get_input_embeddings().weight.detach().clone()
    quant = quantize_model(
        m, _batches(), QuantSetting.parse("w4"), "search", GRID, lm_head=True, embedding=True, log=lambda s: None
    )
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.get_input_embeddings(), QuantEmbedding)
    assert not m.config.tie_word_embeddings
    emb_q = m.get_input_embeddings().weight
    assert not torch.equal(emb_q, emb_before) and (emb_q - emb_before).abs().max() < emb_before.abs().max()
    ids = _batches(1, seed=5)[0]
    with torch.no_grad():
        ref = m(**ids).logits
    back = load_quantized(str(save_quantized(m, quant, str(tmp_path / "q"))))
    with torch.no_grad():
        assert torch.equal(back(**ids).logits, ref)


def test_head_kept_full_precision_stays_tied(tmp_path):
    m = _model(tie=True)
    quant = quantize_model(m, _batches(), QuantSetting.parse("w4a4"), "minmax_fp", GRID, log=lambda s: None)
    assert m.config.tie_word_embeddings and m.lm_head.weight is m.get_input_embeddings().weight
    back = load_quantized(str(save_quantized(m, quant, str(tmp_path / "q"))))
    assert back.lm_head.weight is back.get_input_embeddings().weight


def test_too_little_calibration_is_refused_before_any_layer_changes():
    m = _model()
    tiny = [{"input_ids": torch.randint(1, 64, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}]
    with pytest.raises(CalibrationError, match="20 tokens in 2 samples, need at least 256"):
        quantize_model(m, tiny, QuantSetting.parse("w4a4"), "search", GRID)
    assert not any(isinstance(mod, QuantLinear) for mod in m.modules())


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="no quantization.json"):
        load_quantized(str(tmp_path))
