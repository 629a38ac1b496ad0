"""Chain arithmetic: a project-made reasoning task whose SFT targets are correct but verbose.

A problem is a chain of single-digit additions and subtractions, e.g. ``Compute 3+4-2``; the
shortest solution states each step and boxes the result::

    3+4=7
    7-2=5
    \\boxed{5}

Verbose targets (what the tiny policy is warm-started on) add, at random, a restatement of the
problem and 0-2 redundant lines after each step ("check 3+4=7 ok", "check: so far 7",
"check: 7 is right"; see ``REDUNDANT_LINES_P``).
Every redundant line is true, so a policy that drops them stays correct while using fewer tokens:
exactly what efficient-reasoning RL has to learn.

Running values never go below zero. The held-out split is the set of chains whose text hashes to
0 mod 10 (a fixed, disjoint tenth of all chains); training never sees them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAME = "chain_arith"
MIN_STEPS, MAX_STEPS = 2, 3


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) per step

    @property
    def expression(self) -> str:
        return f"{self.start}" + "".join(f"{op}{x}" for op, x in self.ops)

    @property
    def question(self) -> str:
        return f"Compute {self.expression}"

    def running_values(self) -> list[int]:
        values, v = [], self.start
        for op, x in self.ops:
            v = v + x if op == "+" else v - x
            values.append(v)
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def steps(self) -> list[tuple[int, str, int, int]]:
        out, prev = [], self.start
        for (op, x), v in zip(self.ops, self.running_values()):
            out.append((prev, op, x, v))
            prev = v
        return out

    @property
    def split(self) -> str:
        digest = hashlib.sha256(self.expression.encode()).digest()
        return "eval" if digest[0] % 10 == 0 else "train"


def shortest_solution(p: Problem) -> str:
    lines = [f"{a}{op}{x}={v}" for a, op, x, v in p.steps()]
    return "\n".join(lines + [f"\\boxed{{{p.answer}}}"])


REDUNDANT_LINES_P = (0.15, 0.35, 0.5)  # P(0, 1, 2 redundant lines after a step)
RESTATE_P = 0.6


def verbose_solution(p: Problem, rng: random.Random) -> str:
    """A correct solution padded with true but useless lines.

    Redundant lines all start with "check", and more of them is always the likelier choice, so the
    policy's greedy (modal) output is verbose too, not only its samples.
    """
    lines = [f"we need {p.expression}"] if rng.random() < RESTATE_P else []
    for a, op, x, v in p.steps():
        lines.append(f"{a}{op}{x}={v}")
        fillers = [f"check {a}{op}{x}={v} ok", f"check: so far {v}", f"check: {v} is right"]
        count = rng.choices(range(len(REDUNDANT_LINES_P)), weights=REDUNDANT_LINES_P)[0]
        lines += [rng.choice(fillers) for _ in range(count)]
    return "\n".join(lines + [f"\\boxed{{{p.answer}}}"])


def random_problem(rng: random.Random) -> Problem:
    start = rng.randint(1, 9)
    ops, v = [], start
    for _ in range(rng.randint(MIN_STEPS, MAX_STEPS)):
        x = rng.randint(1, 9)
        op = "-" if (x <= v and rng.random() < 0.5) else "+"
        v = v + x if op == "+" else v - x
        ops.append((op, x))
    return Problem(start, tuple(ops))


def problems(split: str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of the given split ("train" or "eval"), reproducible from ``seed``.

    Eval problems are distinct from each other (as far as the split has room); train problems are
    drawn with replacement.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"chain_arith split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{NAME}/{split}/{seed}")
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        p = random_problem(rng)
        if p.split != split:
            continue
        if split == "eval" and p.expression in seen and attempts < 100 * n:
            continue
        seen.add(p.expression)
        out.append(p)
    return out


def rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Dataset rows: ``question`` (the prompt text), ``answer`` (the gold final answer) and
    ``shortest_solution`` (the shortest correct solution: the floor that evaluations measure against)."""
    return [
        {"question": p.question, "answer": str(p.answer), "shortest_solution": shortest_solution(p)}
        for p in problems(split, n, seed)
    ]
