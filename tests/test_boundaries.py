"""The pure layers (DESIGN.md) never import ray, vllm or deepspeed: neither in their source nor at run time."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = ["gdpo/advantages.py", "gdpo/losses.py", "gdpo/dora.py", "rewards", "compression", "kernels"]
FORBIDDEN = ("ray", "vllm", "deepspeed")


def _files():
    for p in PURE:
        path = ROOT / p
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def test_pure_sources_do_not_import_the_distributed_stack():
    offenders = []
    for f in _files():
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            )
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders
    assert len(list(_files())) > 10


def test_importing_the_pure_modules_loads_none_of_it():
    mods = sorted({".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in _files()})
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
