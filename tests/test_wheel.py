"""The installed package carries its presets: from a wheel, outside the checkout, the embedded default
config and every preset load by name (`gdpo demo` needs no source tree)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_outside_the_checkout_finds_its_presets(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "*.egg-info", "runs", "__pycache__"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gdpo-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True
    )
    probe = (
        "import gdpo, gdpo.config as c; "
        "print(gdpo.__file__); "
        "cfg = c.load_config(); print(cfg.model.path); "
        "print(c.load_config('multireward_cpu').rewards.correctness); "
        "print(c.load_config('configs/gsm8k_qwen2.5_1.5b.yaml').model.path); "
        "from compression.ofq.experiment import load_ofq_config; print(load_ofq_config('ofq_digits_cpu').model); "
        "print(c.PRESETS)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(str(site))  # the wheel's package, not the checkout
    assert out[1:4] == ["builtin:tiny-chain-arith", "accuracy", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert out[4]
    assert out[5] == str(site / "gdpo" / "configs")  # the wheel's copy of the top-level configs/
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"gdpo/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert presets and presets <= names  # every preset and model shape, once, inside the package
    assert not any(n.startswith("configs/") for n in names)
