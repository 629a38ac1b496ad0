"""The project's DoRA against peft's: forward, gradients, files both ways, merge round trip, errors."""

import json

import pytest
import torch
from torch import nn

from gdpo import dora


def _randomize(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _pair(in_f, out_f, bias, rank=4, alpha=8.0, dropout=0.0, use_rslora=False, seed=0):
    """The same linear layer adapted by peft and by the project, with identical adapter values."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    ours = dora.apply_dora(nn.Sequential(nn.Linear(in_f, out_f, bias=bias)), ["0"], rank, alpha, dropout, use_rslora)
    ours[0].base_layer.load_state_dict(base[0].state_dict())
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, target_modules=["0"], use_dora=True
        ),
    )
    _randomize(peft_model)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        ours[0].lora_A.copy_(layer.lora_A["default"].weight)
        ours[0].lora_B.copy_(layer.lora_B["default"].weight)
        ours[0].lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    return ours, peft_model, layer


def _grads(model, x, dy):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    return (
        y.detach(),
        x.grad,
        {
            n.split(".")[-1].replace("weight", ""): p.grad.clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        },
    )


@pytest.mark.parametrize(
    "in_f,out_f,bias,use_rslora", [(64, 48, True, False), (32, 96, False, False), (80, 80, False, True)]
)
def test_forward_and_gradients_match_peft(in_f, out_f, bias, use_rslora):
    ours, peft_model, layer = _pair(in_f, out_f, bias, use_rslora=use_rslora)
    x = torch.randn(3, 7, in_f)  # [batch, seq, in]
    dy = torch.randn(3, 7, out_f)
    y0, dx0, g0 = _grads(ours, x, dy)
    y1, dx1, g1 = _grads(peft_model, x, dy)
    assert y0.shape == (3, 7, out_f)
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx0, dx1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g0["lora_A"], layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g0["lora_B"], layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        g0["lora_magnitude_vector"], layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-5
    )
    assert g0["lora_B"].abs().max() > 0  # the check can fail: the adapter is not at its zero init


def test_dropout_path_matches_peft_under_the_same_rng():
    ours, peft_model, layer = _pair(24, 16, True, dropout=0.3)
    ours.train(), peft_model.train()
    x, dy = torch.randn(5, 24), torch.randn(5, 16)
    torch.manual_seed(7)
    y0, dx0, g0 = _grads(ours, x, dy)
    torch.manual_seed(7)
    y1, dx1, _ = _grads(peft_model, x, dy)
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx0, dx1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        g0["lora_magnitude_vector"], layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-5
    )
    ours.eval()  # dropout is off in eval: the fused path gives the same as peft's eval forward
    peft_model.eval()
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_merge_matches_peft_merge():
    ours, peft_model, layer = _pair(16, 8, True)
    expected = peft_model.merge_and_unload()[0].weight
    dora.merge_dora(ours)
    torch.testing.assert_close(ours[0].base_layer.weight, expected, rtol=1e-5, atol=1e-6)


def test_row_norm_matches_the_materialized_norm():
    torch.manual_seed(0)
    w0, a, b = torch.randn(33, 20), torch.randn(5, 20), torch.randn(33, 5)
    expected = torch.linalg.vector_norm(w0 + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(dora.dora_row_norm(w0, a, b, 0.7), expected, rtol=1e-5, atol=1e-5)


def test_init_is_the_base_layer_and_only_adapters_train():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(6, 16)
    before = base(x)
    model = dora.apply_dora(base, ["0"], rank=2, alpha=4)
    assert isinstance(model[0], dora.DoraLinear) and not isinstance(model[2], dora.DoraLinear)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # B = 0, m = ‖W0‖: the base output
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "0.lora_A",
        "0.lora_B",
        "0.lora_magnitude_vector",
    ]


def test_merge_unmerge_round_trip_is_exact_and_disable_gives_the_base():
    torch.manual_seed(0)
    model = dora.apply_dora(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8, bias=False)), ["0", "1"], 4, 8)
    _randomize(model)
    w0 = [model[i].base_layer.weight.clone() for i in range(2)]
    x = torch.randn(4, 16)
    with dora.adapters_disabled(model):
        base_out = nn.functional.linear(nn.functional.linear(x, w0[0], model[0].base_layer.bias), w0[1])
        torch.testing.assert_close(model(x), base_out)
    y = model(x)
    assert not torch.allclose(y, base_out, atol=1e-3)
    dora.merge_dora(model)
    assert not torch.equal(model[0].base_layer.weight, w0[0])
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with dora.adapters_disabled(model):
        torch.testing.assert_close(model(x), base_out)
    dora.unmerge_dora(model)
    assert all(torch.equal(model[i].base_layer.weight, w0[i]) for i in range(2))
    torch.testing.assert_close(model(x), y)


def _tiny_lm(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def test_adapter_saved_by_the_project_loads_in_peft(tmp_path):
    from peft import PeftModel

    ours = dora.apply_dora(_tiny_lm(), TARGETS, rank=4, alpha=8)
    _randomize(ours)
    dora.save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = PeftModel.from_pretrained(_tiny_lm(), tmp_path / "adapter").eval()
    ids = torch.randint(0, 64, (2, 9))
    expected = ours(input_ids=ids).logits
    assert not torch.allclose(expected, _tiny_lm()(input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_adapter_saved_by_peft_loads_into_the_project(tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(
        _tiny_lm(), LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM")
    ).eval()
    _randomize(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = dora.load_adapter(_tiny_lm(), tmp_path / "peft")
    assert sum(1 for _ in dora.dora_layers(ours)) == 2 * len(TARGETS)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_merged_state_dict_is_a_plain_model_with_the_adapted_outputs():
    ours = dora.apply_dora(_tiny_lm(), TARGETS, rank=4, alpha=8)
    _randomize(ours)
    plain = _tiny_lm(seed=5)
    missing, unexpected = plain.load_state_dict(dora.merged_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_bad_adapters_and_targets_are_named(tmp_path):
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        dora.apply_dora(_tiny_lm(), ["qproj"], 4, 8)
    with pytest.raises(ValueError, match="matched only"):
        dora.apply_dora(_tiny_lm(), ["mlp"], 4, 8)
    ours = dora.apply_dora(_tiny_lm(), ["q_proj"], rank=4, alpha=8)
    dora.save_adapter(ours, tmp_path / "a")
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 64\), the model needs \(2, 64\)"):
        dora.load_adapter(dora.apply_dora(_tiny_lm(), ["q_proj"], rank=2, alpha=8), tmp_path / "a")
    with pytest.raises(ValueError, match="missing .*v_proj"):
        dora.load_adapter(dora.apply_dora(_tiny_lm(), ["q_proj", "v_proj"], rank=4, alpha=8), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(ValueError, match="adapter does not fit the model: .*unexpected .*lora_magnitude_vector"):
        dora.load_adapter(_tiny_lm(), tmp_path / "a")  # read as plain LoRA, the magnitudes are left over
    with pytest.raises(ValueError, match="a plain LoRA adapter, the model's layers are DoRA"):
        dora.load_adapter(dora.apply_dora(_tiny_lm(), ["q_proj"], rank=4, alpha=8), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        dora.load_adapter(_tiny_lm(), tmp_path / "nothing")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_gpu_matches_peft_with_the_triton_norm():
    ours, peft_model, layer = _pair(512, 384, True, rank=16, alpha=32)
    ours, peft_model = ours.cuda().bfloat16(), peft_model.cuda().bfloat16()
    x, dy = torch.randn(4, 64, 512, device="cuda"), torch.randn(4, 64, 384, device="cuda")
    y0, dx0, g0 = _grads(ours, x.bfloat16(), dy.bfloat16())
    y1, dx1, _ = _grads(peft_model, x.bfloat16(), dy.bfloat16())
    torch.testing.assert_close(y0.float(), y1.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx0.float(), dx1.float(), rtol=2e-2, atol=2e-2)
    w = ours[0]
    from kernels.dora_norm import dora_row_norm_reference, dora_row_norm_triton

    torch.testing.assert_close(
        dora_row_norm_triton(w.base_layer.weight, w.lora_A, w.lora_B, w.scale),
        dora_row_norm_reference(w.base_layer.weight, w.lora_A, w.lora_B, w.scale),
        rtol=1e-3,
        atol=1e-3,
    )


def test_plain_lora_round_trips_with_peft_and_merges_exactly(tmp_path):
    """``use_dora=False``: ``W0 + s·BA``, no magnitude; peft reads what the project writes and back."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ours = dora.apply_dora(_tiny_lm(), TARGETS, rank=4, alpha=8, use_dora=False)
    assert all(not layer.use_dora and layer.lora_magnitude_vector is None for _, layer in dora.dora_layers(ours))
    _randomize(ours)
    dora.save_adapter(ours, tmp_path / "lora")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["use_dora"] is False and not any("magnitude" in k for k in dora.adapter_state_dict(ours))
    ids = torch.randint(0, 64, (2, 9))
    expected = ours(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(_tiny_lm(), tmp_path / "lora").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    peft_lora = get_peft_model(_tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    _randomize(peft_lora, seed=3)
    peft_lora.save_pretrained(tmp_path / "peft")
    back = dora.load_adapter(_tiny_lm(), tmp_path / "peft")
    torch.testing.assert_close(back(input_ids=ids).logits, peft_lora(input_ids=ids).logits, rtol=1e-4, atol=1e-5)

    plain = _tiny_lm(seed=5)
    plain.load_state_dict(dora.merged_state_dict(ours), strict=False)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    w0 = {n: layer.base_layer.weight.clone() for n, layer in dora.dora_layers(ours)}
    dora.merge_dora(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    dora.unmerge_dora(ours)
    assert all(torch.equal(layer.base_layer.weight, w0[n]) for n, layer in dora.dora_layers(ours))
