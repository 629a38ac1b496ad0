"""GPTQ (Frantar et al., 2023) through llm-compressor, the vLLM project's quantization library: the 4-bit
base that EoRA's paper compensates, written as the compressed-tensors checkpoint vLLM serves.

llm-compressor pins compressed-tensors 0.19 and transformers <= 5.17, vLLM 0.32 pins compressed-tensors
0.17: the two cannot share one environment (llm-compressor's documentation runs them apart too). So
``make install`` puts llm-compressor and those pins in a separate site directory
(``<venv>/gptq-site``, or ``$GDPO_GPTQ_SITE``) that overrides only them, and :func:`run_gptq` runs
``compression/gptq_worker.py`` in a child process with that directory first on its path. The
checkpoint it writes is read back here with this environment's compressed-tensors (decompressed, for
EoRA and the simulation rows) and served by vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from compression.calib import CalibrationError

__all__ = ["GPTQError", "GPTQ_PINS", "gptq_site", "run_gptq", "load_decompressed"]

GPTQ_PINS = (  # what `make install` puts in the site directory (keep in step with the Makefile)
    "llmcompressor==0.14.0.1",
    "compressed-tensors==0.19.0",
    "transformers==5.17.0",
    "auto-round==0.15.1",
    "huggingface_hub==1.33.0",
)


class GPTQError(RuntimeError):
    """GPTQ could not run; the message says what is missing or what the worker reported."""


def gptq_site() -> Path:
    return Path(os.environ.get("GDPO_GPTQ_SITE") or Path(sys.prefix) / "gptq-site")


def run_gptq(
    model_dir: str,
    batches: Sequence[dict],
    out_dir: str,
    bits: int = 4,
    dampening: float = 0.01,
    block_size: int = 128,
    log: Callable[[str], None] = print,
    timeout: Optional[float] = None,
) -> Path:
    """GPTQ-quantize ``model_dir``'s linear layers (not the head) to INT``bits`` weights, symmetric, one
    scale per output channel (W4A16: vLLM's CPU and Marlin kernels), calibrated on ``batches``' real
    tokens; writes the compressed-tensors checkpoint to ``out_dir`` (atomically, by the worker)."""
    site = gptq_site()
    if not (site / "llmcompressor").is_dir():
        raise GPTQError(
            f"llm-compressor is not installed in {site} (set GDPO_GPTQ_SITE or run `make install`, which runs "
            f"pip install --no-deps --target {site} {' '.join(GPTQ_PINS)})"
        )
    if bits != 4:
        raise GPTQError(f"GPTQ bits {bits}: only 4-bit weights (W4A16) are served by vLLM's CPU kernel")
    samples = []
    for b in batches:
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
            real = [t for t, m in zip(ids, mask) if m]  # the real tokens (padding dropped)
            if real:
                samples.append(real)
    if not samples:
        raise CalibrationError("GPTQ calibration: no sample has a real token")
    with tempfile.TemporaryDirectory(prefix="gdpo-gptq-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps(
                {
                    "model": str(Path(model_dir).resolve()),
                    "out": str(Path(out_dir).resolve()),
                    "samples": samples,
                    "bits": bits,
                    "dampening": dampening,
                    "block_size": block_size,
                }
            )
        )
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(root)])}
        log(f"GPTQ (llm-compressor, in {site}): {len(samples)} calibration samples")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("gptq_worker.py")), str(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise GPTQError(f"the GPTQ worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(out_dir)


@torch.no_grad()
def load_decompressed(path: str) -> nn.Module:
    """The checkpoint's model with its quantized weights decoded (by compressed-tensors) into plain
    float32 nn.Linear layers: what the served kernel computes with, for EoRA and the simulation rows."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for mod in model.modules():  # compressed-tensors' bookkeeping (scales, zero points): the weights are plain now
        if isinstance(mod, nn.Linear):
            for name in [n for n, _ in mod.named_parameters(recurse=False) if n not in ("weight", "bias")]:
                delattr(mod, name)
            for name in [n for n, _ in mod.named_buffers(recurse=False) if n not in ("weight", "bias")]:
                delattr(mod, name)
        for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
            if hasattr(mod, attr):
                delattr(mod, attr)
        if "forward" in vars(mod):  # compressed-tensors' quantized forward: back to the class's own
            del mod.forward
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval()
