"""``gdpo compress --pipeline fp4`` end to end on the tiny policy (transformers + math-verify), shrunk."""

import json

import pytest
import torch

from gdpo.cli import main

pytestmark = pytest.mark.e2e


def test_compress_fp4_compares_methods_and_saves_a_checkpoint_that_is_what_was_evaluated(tmp_path, capsys):
    out = tmp_path / "fp4"
    args = [
        "compress",
        "--model",
        "builtin:tiny-chain-arith",
        "--pipeline",
        "fp4",
        "--bits",
        "w4a4",
        "--calib",
        "task:chain_arith",
        "--calib-samples",
        "32",
        "--eval-limit",
        "16",
        "--out",
        str(out),
        "--grid-points",
        "16",
        "--grid-act-points",
        "8",
        "--grid-rounds",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gap recovered" in printed and "minmax_fp" in printed
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["full", "minmax_int", "minmax_fp", "search"]
    assert res["held_out"]["prompts"] == 16 and res["calibration"]["tokens"] >= 256
    full, mm, srch = (res["methods"][k] for k in ("full", "minmax_fp", "search"))
    for m in (full, mm, srch):
        assert 0.0 <= m["accuracy"] <= 1.0 and m["perplexity"] > 1.0 and m["mean_tokens"] > 0
    assert srch["calib_output_mse_mean"] < mm["calib_output_mse_mean"]
    assert set(srch["gap_recovered"]) == {"accuracy", "perplexity"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 16 and {s["method"] for s in samples} == set(res["methods"])

    from compression.fp4.model import load_quantized
    from gdpo.compress import _batches, perplexity, reference_texts
    from gdpo.config import load_config
    from transformers import AutoTokenizer

    model = load_quantized(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    prompts, sols, _ = reference_texts("task:chain_arith", "eval", 16, 0, load_config(None, []), tok)
    assert perplexity(model, _batches(tok, prompts, sols)) == pytest.approx(srch["perplexity"], rel=1e-6)
    assert json.loads((out / "model" / "quantization.json").read_text())["setting"] == "w4a4"
    assert any(t.dtype == torch.uint8 for t in _tensors(out / "model" / "model.safetensors"))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path)).values()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bits", "w3a4"], "--bits: bits 'w3a4': weight bits must be 4 or 8"),
        (["--pipeline", "awq"], "unknown stage 'awq'"),
        (["--pipeline", "fp4,svd"], "only eora may follow"),
        (["--methods", "search,awq"], "unknown method awq"),
        (["--calib-samples", "1"], "calibration data too small"),
        (["--target", "int3"], "--target 'int3': expected one of sim, vllm-w4a16, nvfp4, mxfp4"),
        (["--pipeline", "fp4,eora", "--bits", "w8a8"], "--target vllm-w4a16 stores 4-bit weights"),
        (["--pipeline", "prune24,eora", "--target", "nvfp4"], "only the fp4 compressor writes"),
        (["--pipeline", "fp4,eora", "--lm-head"], "--lm-head: --target vllm-w4a16 exports the decoder's linear"),
        (["--pipeline", "gptq,eora", "--bits", "w4a4"], "--pipeline gptq quantizes weights only, to 4 bits"),
        (["--pipeline", "gptq,eora", "--target", "nvfp4"], "GPTQ writes INT4 W4A16 (--target vllm-w4a16) only"),
        (["--model", "/nonexistent"], "no such directory"),
    ],
)
def test_bad_input_is_refused_before_work(tmp_path, capsys, flags, message):
    args = ["compress", "--model", "builtin:tiny-chain-arith", "--out", str(tmp_path / "o"), *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_pipeline_fp4_eora_serves_compressed_base_plus_lora_on_vllm(tmp_path, capsys):
    out = tmp_path / "pipe"
    args = [
        "compress",
        "--policy",
        "builtin:tiny-chain-arith",
        "--pipeline",
        "fp4,eora",
        "--bits",
        "w4a4",
        "--rank",
        "16",
        "--calib-samples",
        "32",
        "--eval-limit",
        "8",
        "--max-new-tokens",
        "96",
        "--out",
        str(out),
        "--grid-points",
        "12",
        "--grid-act-points",
        "6",
        "--grid-rounds",
        "1",
    ]
    assert main(args) == 0
    assert "recovered" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["full", "fp4", "fp4+svd", "fp4+eora", "full.bf16", "fp4.served", "fp4+eora.served"]
    for name, row in res["variants"].items():
        ev = json.loads((out / "evals" / name / "results.json").read_text())
        assert ev["metrics"]["prompts"] == 8 and row["accuracy"] == ev["metrics"]["accuracy"]
        assert (ev["lora"] is not None) == ("+" in name)
        assert ("with_quantized_activations" in row) == (name in ("fp4", "fp4+svd", "fp4+eora"))
        assert ("W4A16" in row["ran"]) == name.endswith(".served") and ("LoRA" in row["ran"]) == ("+" in name)
    # the export: compressed-tensors INT4 W4A16, the quantized layers at most 0.3x their bf16 bytes on disk
    export = res["export"]
    assert export["format"] == "pack-quantized" and export["max_decode_error"] < 1e-6
    assert export["bytes"]["layers"] == 28 and export["bytes"]["quantized_ratio"] <= 0.3
    assert export["folded_shift_layers"], "w4a4's pre-shifts are folded into the layers before"
    served = res["variants"]["fp4.served"]["disk"]
    assert served["model"] == sum(f.stat().st_size for f in (out / "served").glob("*.safetensors"))
    assert served["model"] < res["variants"]["full"]["disk"]["model"] / 4  # fp32 original vs 4-bit + bf16 rest
    assert (out / "adapters" / "eora-served" / "adapter_config.json").is_file()
    _independent_vllm_load_generates(out / "served", tmp_path)
    v = res["variants"]
    assert v["fp4"]["bytes"]["total"] < v["full"]["bytes"]["total"]
    assert v["fp4+eora"]["bytes"]["compensation"] > 0
    assert v["fp4+eora"]["output_error_after"] < v["fp4+eora"]["output_error_before"]
    assert v["fp4+eora"]["output_error_after"] <= v["fp4+svd"]["output_error_after"] * 1.05
    conf = json.loads((out / "adapters" / "eora" / "adapter_config.json").read_text())
    assert conf["r"] == 16 and conf["peft_type"] == "LORA"
    assert (out / "report" / "report.html").is_file() and (out / "model" / "quantization.json").is_file()


def _independent_vllm_load_generates(path, tmp_path):
    """The served directory loads in plain vLLM (no project code on the path) and generates."""
    import os
    import subprocess
    import sys

    script = tmp_path / "load.py"
    script.write_text(
        "import sys\n"
        "if __name__ == '__main__':\n"
        "    from vllm import LLM, SamplingParams\n"
        "    llm = LLM(sys.argv[1], dtype='bfloat16', max_model_len=256, enforce_eager=True)\n"
        "    out = llm.generate(['What is 3 + 4?'], SamplingParams(max_tokens=16, temperature=0))\n"
        "    print('GENERATED', len(out[0].outputs[0].token_ids), repr(out[0].outputs[0].text))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("GENERATED")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    assert int(line[0].split()[1]) > 0
    assert "CPUWNA16" in proc.stderr + proc.stdout  # vLLM ran its 4-bit kernel, not a dequantized copy


def test_pipeline_gptq_eora_compensates_the_served_gptq_base(tmp_path, capsys):
    """GPTQ by llm-compressor (its own site directory), read back by this environment's compressed-tensors,
    EoRA on the decoded weights, served by vLLM's W4A16 kernel with the adapter on top."""
    out = tmp_path / "gptq"
    args = ["compress", "--policy", "builtin:tiny-chain-arith", "--pipeline", "gptq,eora", "--rank", "16"]
    args += ["--calib-samples", "32", "--eval-limit", "8", "--max-new-tokens", "96", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == [
        "full",
        "gptq",
        "gptq+svd",
        "gptq+eora",
        "full.bf16",
        "gptq.served",
        "gptq+eora.served",
    ]
    assert res["compressor"]["library"].startswith("llmcompressor==")
    conf = json.loads((out / "served" / "config.json").read_text())["quantization_config"]
    assert conf["config_groups"]["group_0"]["weights"]["strategy"] == "channel" and conf["format"] == "pack-quantized"
    assert res["export"]["bytes"]["quantized_ratio"] <= 0.3
    v = res["variants"]
    assert v["gptq+eora"]["output_error_after"] < v["gptq+eora"]["output_error_before"]
    assert v["gptq+eora"]["output_error_after"] <= v["gptq+svd"]["output_error_after"] * 1.05
    assert "CPUWNA16" in v["gptq.served"]["ran"] and "EoRA" in v["gptq+eora.served"]["ran"]

    # the simulation rows read exactly the weights the served checkpoint decodes to
    from compression.gptq import load_decompressed
    from transformers import AutoModelForCausalLM

    decoded, dense = load_decompressed(str(out / "served")), AutoModelForCausalLM.from_pretrained(out / "compressed")
    for name, mod in decoded.named_modules():
        if name.endswith("proj"):
            assert torch.equal(mod.weight, dense.get_submodule(name).weight), name
            w = mod.weight / mod.weight.abs().amax(1, keepdim=True)
            assert torch.unique(torch.round(w * 7)).numel() <= 16  # 4-bit levels per row


def test_gptq_without_its_site_directory_says_how_to_install_it(tmp_path, monkeypatch):
    from compression.gptq import GPTQError, run_gptq

    monkeypatch.setenv("GDPO_GPTQ_SITE", str(tmp_path / "none"))
    with pytest.raises(GPTQError, match="llm-compressor is not installed in .*none.*make install"):
        run_gptq("unused", [], str(tmp_path / "out"))


def test_gptq_without_its_site_directory_is_refused_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GDPO_GPTQ_SITE", str(tmp_path / "none"))
    args = ["compress", "--model", "builtin:tiny-chain-arith", "--pipeline", "gptq,eora", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "llm-compressor is not installed in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
