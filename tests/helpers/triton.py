"""Run Triton tests under the interpreter: ``TRITON_INTERPRET`` only counts if set before triton is
imported, so a test marked ``@interpreted`` reruns itself in a child pytest with the variable set
(unless this process already has it, e.g. ``TRITON_INTERPRET=1 pytest tests/kernels``)."""

import functools
import os
import subprocess
import sys

import pytest


def interpreted(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return test(*args, **kwargs)
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]  # "path::name[params]"
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == 0, f"{node} under TRITON_INTERPRET=1:\n{child.stdout[-4000:]}{child.stderr[-2000:]}"

    return run
