import random

from gdpo.tasks import chain_arith
from gdpo.tasks.chain_arith import Problem, shortest_solution, verbose_solution


def test_solution_text_hand_computed():
    p = Problem(3, (("+", 4), ("-", 2)))
    assert p.question == "Compute 3+4-2" and p.answer == 5
    assert shortest_solution(p) == "3+4=7\n7-2=5\n\\boxed{5}"


def test_verbose_solutions_are_true_and_longer():
    rng = random.Random(0)
    for p in chain_arith.problems("train", 200, seed=1):
        text = verbose_solution(p, rng)
        assert text.startswith(("we need", f"{p.start}"))
        assert text.endswith(f"\\boxed{{{p.answer}}}")
        # every equation line is arithmetic truth
        for line in text.splitlines():
            expr = line.removeprefix("check ").removesuffix(" ok")
            if "=" in expr:
                lhs, rhs = expr.split("=")
                assert eval(lhs) == int(rhs)
        assert all(v >= 0 for v in p.running_values())
    lengths = [len(verbose_solution(p, rng)) / len(shortest_solution(p)) for p in chain_arith.problems("train", 500, 2)]
    assert sum(lengths) / len(lengths) > 1.8


def test_splits_are_disjoint_deterministic_and_distinct():
    evals = chain_arith.problems("eval", 300, seed=0)
    assert evals == chain_arith.problems("eval", 300, seed=0)
    assert len({p.expression for p in evals}) == 300
    assert all(p.split == "eval" for p in evals)
    assert not {p.expression for p in chain_arith.problems("train", 3000, 0)} & {p.expression for p in evals}
    rows = chain_arith.rows("eval", 3)
    assert set(rows[0]) == {"question", "answer", "shortest_solution"}
    assert rows[0]["shortest_solution"] == chain_arith.shortest_solution(evals[0])
