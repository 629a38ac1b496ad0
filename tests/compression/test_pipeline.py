"""Model-level compensation (sequential), LoRA export that peft and vLLM read, dense export, byte accounting."""

import copy
import json

import pytest
import torch

import compression.pipeline as pipeline
from compression.calib import target_linears
from compression.fp4.model import quantize_model
from compression.fp4.search import QuantSetting, SearchGrid
from compression.pipeline import Compensated, compensate_model, save_dense, save_lora, storage_bytes
from compression.prune import prune_linears
from tests.compression.test_fp4_model import _batches, _model

GRID = SearchGrid(points=12, act_points=6, rounds=1)


def _compressed(kind):
    full = _model(tie=True)
    comp = copy.deepcopy(full)
    names = target_linears(full)
    if kind == "prune24":
        prune_linears(comp, names, "2:4")
    else:
        quantize_model(comp, _batches(), QuantSetting.parse(kind), "search", GRID, log=lambda s: None)
    ref = {n: full.get_submodule(n).weight.detach().clone() for n in names}
    return full, comp, ref


@pytest.mark.parametrize("kind", ["prune24", "w4", "w4a4"])
def test_eora_beats_svd_on_every_layer_and_brings_the_model_closer(kind):
    full, comp, ref = _compressed(kind)
    ids = _batches(1, seed=7)[0]
    with torch.no_grad():
        target, before = full(**ids).logits, comp(**ids).logits
    results = {}
    for method in ("svd", "eora"):
        model = copy.deepcopy(comp)
        results[method] = compensate_model(
            model, ref, _batches(), rank=8, method=method, log=lambda s: None, activation_aware=True
        )
        assert sum(isinstance(m, Compensated) for m in model.modules()) == len(ref)
        with torch.no_grad():
            after = model(**ids).logits
        assert (after - target).pow(2).mean() < (before - target).pow(2).mean()
    for name in ref:
        e, v = results["eora"][name], results["svd"][name]
        assert e.error_after < e.error_before
        if name.endswith("layers.0.self_attn.q_proj"):  # block 0 sees the same inputs under both methods
            assert e.error_after <= v.error_after * (1 + 1e-6)


def test_later_blocks_calibrate_on_the_compensated_earlier_ones(monkeypatch):
    _, comp, ref = _compressed("prune24")
    seen = []
    real = pipeline.capture_inputs

    def spy(model, names, batches, max_tokens):
        seen.append([type(model.get_submodule(n)).__name__ for n in ref if ".layers.0." in n])
        return real(model, names, batches, max_tokens)

    monkeypatch.setattr(pipeline, "capture_inputs", spy)
    compensate_model(comp, ref, _batches(), rank=4, log=lambda s: None)
    assert seen[0] == ["Linear"] * 7 and seen[1] == ["Compensated"] * 7


def test_exports_load_in_peft_and_reproduce_the_compensated_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, comp, ref = _compressed("w4")
    dense_dir = save_dense(comp, str(tmp_path / "compressed"))
    model = copy.deepcopy(comp)
    factors = compensate_model(model, ref, _batches(), rank=8, method="eora", log=lambda s: None)
    ad = save_lora(factors, str(tmp_path / "eora"), str(dense_dir), dtype=torch.float32)
    from safetensors.torch import load_file

    default = save_lora(factors, str(tmp_path / "eora16"), str(dense_dir))  # 16-bit factors, as served
    assert {t.dtype for t in load_file(str(default / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    conf = json.loads((ad / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == conf["lora_alpha"] == 8
    assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = _batches(1, seed=3)[0]
    base = AutoModelForCausalLM.from_pretrained(str(dense_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(**ids).logits, comp(**ids).logits, rtol=1e-5, atol=1e-5)
        served = PeftModel.from_pretrained(base, str(ad)).eval()
        torch.testing.assert_close(served(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="carries a compensation"):
        save_dense(model, str(tmp_path / "nope"))


def test_storage_bytes_accounting():
    full, comp, ref = _compressed("w4a4")
    dense = storage_bytes(full)
    n_params = sum(p.numel() for p in full.parameters())
    assert dense["total"] == dense["dense"] == 2 * n_params
    q = storage_bytes(comp)
    linear_params = sum(w.numel() for w in ref.values())
    assert q["quantized"] >= linear_params // 2 and q["quantized"] < linear_params  # ~4 bits a weight + row params
    assert q["total"] < dense["total"]
    _, pr, ref = _compressed("prune24")
    p = storage_bytes(pr, pruned=list(ref))
    assert p["pruned"] == sum(w.numel() // 2 * 2 + (w.numel() // 2 * 2 + 7) // 8 for w in ref.values())
    compensate_model(pr, ref, _batches(), rank=4, log=lambda s: None)
    c = storage_bytes(pr, pruned=list(ref))
    assert c["pruned"] == p["pruned"] and c["dense"] == p["dense"]  # the base is still counted once
    assert c["compensation"] == sum((w.shape[0] + w.shape[1]) * 4 * 2 for w in ref.values())


def test_eora_refuses_a_calibration_smaller_than_the_widest_layer():
    from compression.calib import CalibrationError

    _, comp, ref = _compressed("w4")
    few = _batches(1, width=8)  # 4 rows x 8 tokens, one half padded: 28 real tokens < 64 inputs of down_proj
    with pytest.raises(CalibrationError, match=r"down_proj \(64 inputs\) needs at least 64 calibration tokens"):
        compensate_model(copy.deepcopy(comp), ref, few, rank=4, log=lambda s: None)
    compensate_model(copy.deepcopy(comp), ref, few, rank=4, method="svd", log=lambda s: None)  # no covariance
