"""Runs in its own process with llm-compressor's site directory first on the path (compression.gptq):
``python gptq_worker.py JOB.json``. Reads the model, runs llm-compressor's GPTQModifier over the
calibration samples, writes the compressed-tensors checkpoint (and the tokenizer) atomically."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(job_path: str) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.bfloat16)
    samples = job["samples"]
    data = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=True, strategy="channel")
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=job["block_size"],
        dampening_frac=job["dampening"],
    )
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=len(samples),
        max_seq_length=max(map(len, samples)),
        pipeline="sequential",
    )
    model.save_pretrained(tmp, save_compressed=True)
    for f in Path(job["model"]).iterdir():  # the tokenizer files as they are
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


if __name__ == "__main__":
    main(sys.argv[1])
