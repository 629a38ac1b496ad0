"""OFQ: StatsQ, LSQ, QKR, oscillation tracking and CGA (including the Wq·Wk freeze the release misses)."""

import copy

import pytest
import torch

from compression.ofq.cga import CGA
from compression.ofq.modules import QKRAttention, QLinear, quantize_vit, weight_quantizers
from compression.ofq.oscillation import OscillationTracker
from compression.ofq.quantizers import LSQ, StatsQ, boundary_distance


def _vit(layers=2, seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_statsq_levels_are_symmetric_half_integers_of_twice_the_mean(bits):
    w = torch.randn(6, 40)
    q = StatsQ(bits)
    s = 2 * w.abs().mean(dim=1, keepdim=True)
    n = 2 ** (bits - 1)
    levels = (q(w) / s * n).detach()  # in units of s/n: odd half-integers
    allowed = torch.arange(-n, n) + 0.5
    assert torch.isin(torch.round(levels * 2) / 2, allowed).all()
    assert torch.allclose(levels, torch.round(levels * 2) / 2, atol=1e-4)
    assert not torch.any(q(w) == 0)  # no zero level
    assert len(torch.unique(torch.round(levels * 2))) <= 2**bits
    w.requires_grad_(True)
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_lsq_ranges_init_and_step_gradient_scale():
    x = torch.randn(100, 8)
    signed, unsigned = LSQ(2, signed=True), LSQ(2, signed=False)
    ys, yu = signed(x), unsigned(x.abs())
    assert torch.isin(torch.round(ys / signed.step.abs()), torch.tensor([-2.0, -1.0, 0.0, 1.0])).all()
    assert torch.isin(torch.round(yu / unsigned.step.abs()), torch.tensor([0.0, 1.0, 2.0, 3.0])).all()
    assert float(signed.step.detach()) == pytest.approx(
        2 * float(x.abs().mean()) / 1**0.5, rel=1e-5
    )  # Qp = 1 at 2 bits
    assert float(unsigned.step.detach()) == pytest.approx(4 * float(x.abs().mean()) / 3**0.5, rel=1e-5)
    # the step's gradient is scaled by 1/sqrt(Qp · elements): compare against an unscaled copy
    plain = LSQ(4, signed=True)
    plain(x)
    x2 = x.clone()
    y = plain(x2)
    y.sum().backward()
    g_scaled = float(plain.step.grad)
    s = plain.step.detach().clone().requires_grad_(True)
    v = torch.clamp(x / s, -8, 7)
    ((torch.round(v) - v).detach() + v).mul(s).sum().backward()
    assert g_scaled == pytest.approx(float(s.grad) / (7 * x.numel()) ** 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="2..8 bits"):
        LSQ(1)


def test_statsq_clipped_weights_sit_at_their_level_not_on_a_boundary():
    q = StatsQ(2)
    w = torch.tensor([[10.0, -10.0, 0.1, -0.1, 1.0, -1.0]])  # the large ones are clipped
    lat = q.latent(w)
    assert lat[0, 0] == 1 and lat[0, 1] == -2  # the top and bottom level indices (n = 2)
    assert boundary_distance(lat)[0, :2].tolist() == [0.5, 0.5]
    assert torch.equal(torch.round(lat), q.codes(w).float())


def test_boundary_distance():
    assert boundary_distance(torch.tensor([0.5, 1.0, 1.25, -0.45])).tolist() == pytest.approx([0.0, 0.5, 0.25, 0.05])


def test_qkr_at_8_bits_tracks_the_full_precision_attention_and_keeps_biases():
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        attn = model.vit.layers[0].attention
        h = torch.randn(2, 17, 32)
        q = attn.q_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        k = attn.k_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        logits = q @ k.transpose(-1, -2)
        qkr = QKRAttention(attn, 4, 8, 8)
        h1 = torch.cat([h, torch.ones(2, 17, 1)], -1)
        exact = torch.einsum("bnc,hcd,bmd->bhnm", h1, qkr.qk_product(), h1)
        torch.testing.assert_close(exact, logits, rtol=1e-4, atol=1e-4)  # q/k biases included
    for method in ("ofq", "lsq"):
        q8 = quantize_vit(copy.deepcopy(model), 8, method)
        with torch.no_grad():
            out = q8(pixel_values=x).logits
        assert (out - ref).abs().max() < 0.5 * ref.abs().max()
        assert sum(isinstance(m, QLinear) for m in q8.modules()) == (
            8 if method == "ofq" else 12
        )  # per layer: v, o, fc1, fc2 (+ q, k)


def test_oscillation_tracker_counts_flip_backs_only():
    model = quantize_vit(_vit(layers=1), 2, "lsq")
    model(pixel_values=torch.randn(4, 1, 8, 8))
    lin = model.vit.layers[0].mlp.fc1
    tracker = OscillationTracker(model)
    tracker.step()
    step = lin.wq.step.detach().view(-1, 1)
    with torch.no_grad():
        base = lin.weight.clone()
        lin.weight[0, 0] = step[0, 0] * 0.2  # level 0
    tracker.step()
    with torch.no_grad():
        lin.weight[0, 0] = step[0, 0] * 0.8  # up to level 1: a change, not an oscillation
    assert tracker.step()["oscillation_rate"] == 0.0
    with torch.no_grad():
        lin.weight[0, 0] = step[0, 0] * 0.2  # back down: one oscillation
    m = tracker.step()
    total = sum(t.numel() for _, _, _, read in weight_quantizers(model) for t in [read()])
    assert m["oscillation_rate"] == pytest.approx(1 / total)
    assert 0 <= m["near_boundary"] <= 1
    del base


def test_cga_freezes_exactly_the_weights_beyond_the_boundary_range_recomputed_each_step():
    """The release's rule: frozen = latent value more than br steps from every rounding boundary, from the
    current weights at each call (a weight that moved near a boundary is free again)."""
    from compression.ofq.quantizers import boundary_distance

    model = quantize_vit(_vit(layers=1), 2, "ofq")
    model(pixel_values=torch.randn(16, 1, 8, 8))
    cga = CGA(model, br=0.1)
    share = cga.update_masks()
    total = frozen = 0
    for n, q, param, read in weight_quantizers(model):
        expected = (boundary_distance(q.latent(read().detach())) > 0.1).view_as(param)
        assert torch.equal(cga.masks[n], expected), n
        total, frozen = total + expected.numel(), frozen + int(expected.sum())
    assert share == pytest.approx(frozen / total) and 0.3 < share < 0.95
    name, param = next(iter(cga.params.items()))
    with torch.no_grad():
        param.add_(torch.randn_like(param) * param.abs().mean())  # the weights move: the mask follows
    cga.update_masks()
    quant, read = next((q, r) for n, q, _, r in weight_quantizers(model) if n == name)
    assert torch.equal(cga.masks[name], (boundary_distance(quant.latent(read().detach())) > 0.1).view_as(param))


def test_cga_freezes_its_weights_including_wq_wk_product():
    model = quantize_vit(_vit(layers=1), 2, "ofq")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model(pixel_values=x)
    cga = CGA(model, br=0.2)
    attn = model.vit.layers[0].attention
    assert isinstance(attn.qk, torch.nn.Parameter)  # QKR's matrix is now trained (and frozen) itself
    frozen_share = cga.update_masks()
    assert 0.2 < frozen_share < 0.8
    names = list(cga.masks)
    assert any(n.endswith(".qk") for n in names) and cga.masks[[n for n in names if n.endswith(".qk")][0]].any()
    before = {n: p.detach().clone() for n, p in cga.params.items()}
    codes_before = {n: q.codes(read()).clone() for n, q, _, read in weight_quantizers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        cga.before_step()
        opt.step()
        cga.after_step()
    for n, p in cga.params.items():
        m = cga.masks[n]
        assert torch.equal(p.detach()[m], before[n][m]), n  # frozen: bit for bit
        assert not torch.equal(p.detach()[~m], before[n][~m]), n  # the rest trained
    for n, q, _, read in weight_quantizers(model):
        m = cga.masks[n].view_as(codes_before[n])
        assert torch.equal(q.codes(read())[m], codes_before[n][m])  # scales frozen: levels kept too


def test_quantize_vit_rejects_other_models():
    with pytest.raises(ValueError, match="no transformer layers"):
        quantize_vit(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, "ofq")
    with pytest.raises(ValueError, match="'gptq'"):
        quantize_vit(_vit(), 4, "gptq")


def test_ofq_presets_validate_and_bad_keys_are_named():
    from pathlib import Path

    from gdpo.config import ConfigError
    from compression.ofq.experiment import load_ofq_config

    root = Path(__file__).resolve().parents[2] / "configs"
    digits = load_ofq_config(str(root / "ofq_digits_cpu.yaml"))
    assert digits.data.source == "digits" and digits.qat.bits == (4, 3, 2)
    deit = load_ofq_config(str(root / "ofq_deit_tiny_imagenet.yaml"))
    assert deit.model.arch == "deit" and deit.data.image_size == 224 and deit.qat.cga_br == 0.005
    for override, msg in (
        ("model.patch_size=3", "must divide data.image_size"),
        ("qat.bits=[1]", "qat.bits"),
        ("qat.cga_epochs=99", "qat.cga_epochs"),
        ("qat.methods=[gptq]", "qat.methods"),
        ("data.sorce=digits", "did you mean 'data.source'"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_ofq_config(str(root / "ofq_digits_cpu.yaml"), [override])


def test_ofq_run_end_to_end_shrunk(tmp_path):
    import json

    from compression.ofq.experiment import load_ofq_config, run_ofq
    from pathlib import Path

    cfg = load_ofq_config(
        str(Path(__file__).resolve().parents[2] / "configs" / "ofq_digits_cpu.yaml"),
        [
            "fp.epochs=2",
            "qat.epochs=2",
            "qat.cga_epochs=1",
            "qat.bits=[2]",
            "data.limit=256",
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.mlp_size=64",
        ],
    )
    res = run_ofq(cfg, str(tmp_path / "ofq"), log=lambda s: None)
    saved = json.loads((tmp_path / "ofq" / "results.json").read_text())
    assert set(saved["runs"]) == {"lsq-w2a2", "ofq-w2a2"} and res["runs"].keys() == saved["runs"].keys()
    for r in saved["runs"].values():
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["final_oscillation_rate"] <= 1
        assert len(r["history"]) == 2
    assert saved["runs"]["ofq-w2a2"]["history"][-1]["frozen"] > 0  # CGA ran in the last epoch
    assert (tmp_path / "ofq" / "ofq.png").stat().st_size > 1000
    assert (tmp_path / "ofq" / "fp" / "config.json").is_file()


def test_cga_started_mid_training_trains_the_merged_qk(tmp_path):
    from gdpo.structured import build
    from compression.ofq.experiment import OFQConfig, load_images, train

    cfg = build(OFQConfig, {"data": {"limit": 128}, "qat": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}})
    data = load_images(cfg.data, 0)  # (train, test) splits
    model = quantize_vit(_vit(layers=1), 2, "ofq")
    train(model, data, cfg.qat, 0, 0, cga_br=0.05, cga_from=1, log=lambda s: None)
    attn = model.vit.layers[0].attention
    assert attn.qk is not None
    merged_at_start = attn.wq.detach().transpose(1, 2) @ attn.wk.detach()  # wq/wk stop training once merged
    assert not torch.allclose(attn.qk.detach(), merged_at_start)  # the merged matrix itself was trained


@pytest.mark.parametrize("method", ["ofq", "lsq"])
def test_deit_swaps_and_trains(method):
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    cfg = DeiTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    model = DeiTForImageClassification(cfg).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    q = quantize_vit(copy.deepcopy(model), 8, method)
    out = q(pixel_values=x).logits
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()
    out.sum().backward()
    assert all(p.grad is not None for n, p in q.named_parameters() if "layers.0.mlp.fc1" in n)
