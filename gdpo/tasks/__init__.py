"""Project-made tasks: ``rows(split, n, seed) -> list[dict]`` with ``question`` and ``answer`` columns."""

from __future__ import annotations

from typing import Callable

from gdpo.tasks import chain_arith

TASKS: dict[str, Callable[..., list[dict]]] = {chain_arith.NAME: chain_arith.rows}


def task_rows(name: str, split: str, n: int, seed: int = 0) -> list[dict]:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[name](split, n, seed)
