"""The chain-arithmetic task's rewards of different scale and sparsity, on hand-written completions."""

from rewards.chain_arith import chain_credit, no_restate, tight_budget

SHORTEST = "3+4=7\n7-2=5\n\\boxed{5}"
FLOOR = 18  # tokens of SHORTEST with EOS, as the tiny tokenizer counts them (any number works here)
VERBOSE = "we need 3+4-2\n3+4=7\ncheck: so far 7\n7-2=5\ncheck 7-2=5 ok\n\\boxed{5}"


def test_chain_credit_counts_the_shortest_solutions_lines_in_order():
    texts = [SHORTEST, VERBOSE, "3+4=7\n7-2=4\n\\boxed{4}", "3+4-2=5\n\\boxed{5}", "", "7-2=5\n3+4=7\n\\boxed{5}"]
    # 6·m/3 − 3, m = how many of its lines (a prefix of them) appear in order; the last: only "3+4=7" is in order
    assert chain_credit([], texts, [SHORTEST] * 6) == [3.0, 3.0, -1.0, -3.0, -3.0, -1.0]


def test_no_restate_and_tight_budget():
    assert no_restate([], [SHORTEST, VERBOSE], ["Compute 3+4-2"] * 2) == [1.0, 0.0]
    assert tight_budget([], ["", "", ""], [18, 28, 29], [FLOOR] * 3) == [1.0, 1.0, 0.0]
    assert tight_budget([], [""], [20], [FLOOR], slack=0) == [0.0]
