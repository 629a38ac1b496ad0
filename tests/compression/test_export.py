"""Deployment targets and the compressed-tensors export: the search only picks stored scales, the written
checkpoint decodes (by compressed-tensors, through transformers) to the searched weights, pre-shifts fold
exactly, and a LoRA adapter follows the fold."""

import copy
import json

import pytest
import torch

from compression.calib import target_linears
from compression.export import ExportError, export_bytes, export_compressed, fold_pre_shifts
from compression.fp4.model import quantize_model
from compression.fp4.qlinear import QuantLinear
from compression.fp4.search import QuantSetting, SearchGrid
from compression.fp4.targets import TARGETS, get_target, snap_unit_bias
from compression.pipeline import compensate_model, save_dense, save_lora
from tests.compression.test_fp4_model import _batches

GRID = SearchGrid(points=12, act_points=6, rounds=1)


def _model(kv_heads=2, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier channels, as LLMs' activations have, so that the search shifts some
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 16
            layer.post_attention_layernorm.weight[:4] *= 16
            layer.self_attn.v_proj.weight[:2] *= 16
            layer.mlp.up_proj.weight[:4] *= 16
    return model


def _quantized(target_name, bits, kv_heads=2, dtype=torch.float32):
    full = _model(kv_heads)
    model = copy.deepcopy(full)
    target = get_target(target_name).for_dtype(dtype)
    quantize_model(model, _batches(), QuantSetting.parse(bits), "search", GRID, log=lambda s: None, target=target)
    return full, model, target


def _round_significant(x: torch.Tensor, bits: int) -> torch.Tensor:
    step = torch.exp2(torch.floor(torch.log2(x)) - (bits - 1))
    return torch.round(x / step) * step


def _units_keep(bias: torch.Tensor, bits: int) -> bool:
    """Each row unit 2^-b, as the formats compute it (float64, then float32), is a value with ``bits``
    significant bits up to the float32 bias's own rounding (a few float32 ulps)."""
    u = torch.exp2(-bias.double()).float().double()
    return bool(((_round_significant(u, bits) - u).abs() <= 4e-7 * u).all())


def test_snap_unit_bias_keeps_the_stated_significant_bits_and_is_nearest():
    b = torch.linspace(-3.0, 5.0, 997)
    for bits in (1, 4, 8):
        s = snap_unit_bias(b, bits)
        assert _units_keep(s, bits) and not _units_keep(b, bits)
        u, us = torch.exp2(-b.double()), torch.exp2(-s.double())
        want = _round_significant(u, bits)  # the nearest stored value
        assert bool(((us - want).abs() <= 4e-7 * want).all())
    assert torch.equal(snap_unit_bias(torch.tensor([0.3, 1.7]), 1), torch.tensor([0.0, 2.0]))  # MXFP4: integer b


@pytest.mark.parametrize("name,fmt,bits", [("vllm-w4a16", "E1M2", 8), ("nvfp4", "E2M1", 4), ("mxfp4", "E2M1", 1)])
def test_the_search_under_a_target_picks_only_what_the_target_stores(name, fmt, bits):
    _, model, target = _quantized(name, "w4", dtype=torch.bfloat16)
    assert target.unit_bits == bits
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for m in layers:
        assert m.lq.w_fmt.name == fmt
        assert _units_keep(m.lq.w_param, bits)
    _, sim, _ = _quantized("sim", "w4")
    assert len({m.lq.w_fmt.name for m in sim.modules() if isinstance(m, QuantLinear)}) >= 1  # any format


@pytest.mark.parametrize("name", ["vllm-w4a16", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("bits", ["w4", "w4a4"])
def test_export_decodes_through_compressed_tensors_to_the_searched_weights(tmp_path, name, bits):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, model, target = _quantized(name, bits, dtype=torch.float32)
    searched = copy.deepcopy(model)
    shifts = fold_pre_shifts(searched)  # what the export writes: the shift moved into the layer before
    assert bool(shifts) == (bits == "w4a4")
    info = export_compressed(model, target, str(tmp_path / "ct"), dtype=torch.float32)
    assert info.max_decode_error < 1e-6 and info.layers == 14
    assert sorted(info.folded_shifts.input_shifts) == sorted(shifts.input_shifts)
    conf = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "compressed-tensors" and conf["format"] == info.format
    assert conf["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "ct"), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for n, m in searched.named_modules():
        if isinstance(m, QuantLinear):
            w = loaded.get_submodule(n).weight.float()
            torch.testing.assert_close(w, m.weight, rtol=0, atol=1e-6 * float(m.weight.abs().max()))
    for n, p in searched.state_dict().items():  # the norms carry the folded shifts
        if "layernorm" in n:
            torch.testing.assert_close(loaded.state_dict()[n], p)
    b = export_bytes(str(tmp_path / "ct"))
    assert b["layers"] == 14 and b["quantized_ratio"] <= 0.3  # 4-bit codes + scales vs bf16


def test_folding_the_pre_shifts_leaves_the_quantized_model_unchanged():
    _, model, _ = _quantized("sim", "w4a4")
    assert any(m.lq.a_shift is not None for m in model.modules() if isinstance(m, QuantLinear))
    ids = _batches(1, seed=3)[0]
    with torch.no_grad():
        before = model(**ids).logits
        moved = fold_pre_shifts(model)
        after = model(**ids).logits
    assert moved and all(m.lq.a_shift is None for m in model.modules() if isinstance(m, QuantLinear))
    assert torch.equal(before, after)  # powers of two: exact, activation quantization included


def test_grouped_query_heads_with_different_shifts_cannot_fold_into_v_proj():
    _, model, _ = _quantized("sim", "w4a4", kv_heads=1)
    o = next(m for n, m in model.named_modules() if n.endswith("0.self_attn.o_proj"))
    o.lq.a_shift = torch.zeros(o.in_features, dtype=torch.int32)
    o.lq.a_shift[0] = 1  # head 0 only: the KV head it shares with head 1 cannot carry it
    with pytest.raises(ExportError, match="o_proj: its pre-shifts differ between query heads"):
        fold_pre_shifts(model)


def test_export_refuses_what_the_target_does_not_store(tmp_path):
    _, model, _ = _quantized("sim", "w4")
    if all(m.lq.w_fmt.name == "E1M2" for m in model.modules() if isinstance(m, QuantLinear)):
        pytest.skip("the unconstrained search picked E1M2 everywhere")
    with pytest.raises(ExportError, match="which vllm-w4a16 does not store"):
        export_compressed(model, TARGETS["vllm-w4a16"], str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_lora_adapter_follows_the_folded_shifts(tmp_path):
    """The served base (export, shifts folded) + the adapter saved with those shifts computes what the
    simulated base (unfolded dense weights) + the plain adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    full, model, target = _quantized("vllm-w4a16", "w4a4")
    names = target_linears(full)
    ref = {n: full.get_submodule(n).weight.detach().clone() for n in names}
    dense = save_dense(model, str(tmp_path / "dense"))
    compensated = copy.deepcopy(model)
    factors = compensate_model(compensated, ref, _batches(), rank=4, log=lambda s: None)
    export = export_compressed(copy.deepcopy(model), target, str(tmp_path / "ct"), dtype=torch.float32)
    assert export.folded_shifts
    plain = save_lora(factors, str(tmp_path / "a"), str(dense), dtype=torch.float32)
    shifted = save_lora(factors, str(tmp_path / "b"), export.path, dtype=torch.float32, fold=export.folded_shifts)
    ids = _batches(1, seed=3)[0]
    sim = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(dense)), str(plain)).eval()
    ct = AutoModelForCausalLM.from_pretrained(
        export.path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    served = PeftModel.from_pretrained(ct, str(shifted)).eval()
    unshifted = PeftModel.from_pretrained(copy.deepcopy(ct), str(plain)).eval()
    with torch.no_grad():
        want, got, wrong = sim(**ids).logits, served(**ids).logits, unshifted(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((wrong - want).abs().max()) > 1e-3  # the fold matters: the plain adapter is off
