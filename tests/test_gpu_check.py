"""bench/gpu_check.py, the one-command GPU check, run here at its tiny shape on CPU so that it never rots
(and in full where a GPU is present)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# the GPU machine has PyTorch, Triton, transformers and peft, nothing else of the stack: the check runs with
# these made unimportable, as they are there
ABSENT = ("omegaconf", "ray", "vllm", "deepspeed")
BARE = (
    "import runpy, sys\n"
    f"sys.modules.update(dict.fromkeys({ABSENT!r}))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _run(out: Path, *flags: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", BARE, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _check(r: dict) -> None:
    k = r["kernels"]
    assert k["pack_exact"] and k["unpack_exact"] and k["fake_quant_exact"]  # Triton against the torch references
    assert k["dora_norm_max_rel_err"] < 1e-4
    layers = r["dora_layers"]
    assert {row["variant"] for row in layers} == {"peft-lora", "peft-dora", "gdpo-dora"}
    assert all(row["median_s"] > 0 and row["peak_mib"] > 0 for row in layers)
    step = r["update_step"]
    assert step["tokens_per_s"] > 0 and step["micro_batch"] >= 1 and 0 < step["adapter_parameters"] < step["parameters"]
    assert step["plan_peak_gib"] > 0
    pub = step["publish"]
    assert pub["bytes"] > 0 and pub["merge_s"] > 0 and pub["file_s"] > 0
    ofq = r["ofq_deit"]
    assert ofq["images_per_s"] > 0 and ofq["batch"] >= 4


def test_gpu_check_runs_at_a_tiny_shape_on_cpu(tmp_path):
    r = _run(tmp_path, "--tiny")
    _check(r)
    assert r["update_step"]["micro_batch"] == 8  # the preset's micro-batch fits at the tiny shape
    assert r["update_step"]["publish"]["tensors"] == 2 * (7 + 3)  # per layer: seven projections, q/k/v biases


@pytest.mark.gpu
def test_gpu_check_at_the_real_shape(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    r = _run(tmp_path)
    _check(r)
    step = r["update_step"]
    assert abs(step["plan_peak_gib"] / step["peak_gib"] - 1) < 0.25, step  # the memory plan against the GPU
