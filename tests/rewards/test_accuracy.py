import json
import random
import threading
from pathlib import Path

import pytest

from rewards import BoundReward
from rewards.accuracy import normalize_answer_text
from rewards.verifier_pool import VerifierPool
from tests.helpers.plugins import slow_check

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


def score(completions, answers):
    return BoundReward.from_name("accuracy").score(["p"] * len(completions), completions, {"answer": answers})


def test_answer_forms():
    completions = [
        "so \\boxed{18}",
        "work...\n#### 18",
        "The answer is 18",
        "$\\frac{1}{2}$",
        "\\boxed{0.5}",
        "#### 1,000",
        "\\boxed{17}",
        "no number here",
        "\\boxed{x^2+1}",
    ]
    answers = ["18", "18", "18", "0.5", "\\frac{1}{2}", "1000", "18", "18", "1+x^2"]
    assert score(completions, answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


# MATH-style golds written as bare LaTeX or expressions; the completions box their answer
BARE_GOLDS = [
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1.0),  # a fraction with a root
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{2}}{2}}", 0.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),  # a polynomial
    ("x^2+2x+1", "\\boxed{x^2+1}", 0.0),
    ("(3, -1)", "\\boxed{(3,-1)}", 1.0),  # a tuple (parsed bare, it was the number -1)
    ("(3, -1)", "\\boxed{(-1,3)}", 0.0),
    ("[2, 5)", "\\boxed{[2,5)}", 1.0),  # an interval (parsed bare, it was the number 5)
    ("[2, 5)", "\\boxed{(2,5)}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),  # a radical (parsed bare, it was the number 2)
    ("2\\sqrt{2}", "\\boxed{2\\sqrt{3}}", 0.0),
    ("\\dfrac{3}{4}", "\\boxed{0.75}", 1.0),
    ("\\text{Monday}", "\\boxed{\\text{Monday}}", 1.0),
    ("\\text{Monday}", "\\boxed{\\text{Tuesday}}", 0.0),
]


def test_bare_latex_and_expression_golds_are_judged_as_math_verify_judges_them():
    golds, completions, expected = zip(*BARE_GOLDS)
    assert score(list(completions), list(golds)) == list(expected)


def test_gsm8k_gold_format_is_normalized():
    assert normalize_answer_text("a\nb\n#### 1,234") == "\\boxed{1234}"
    assert normalize_answer_text("\\boxed{3} #### 4") == "\\boxed{3} #### 4"


def test_unparseable_gold_is_none():
    assert score(["\\boxed{3}"], ["not a number at all, no math"]) == [None]


def test_hung_item_scores_none_and_pool_survives():
    pool = VerifierPool(slow_check, processes=2, timeout_s=1.5)
    try:
        items = [("a", "a"), ("b", "hang"), ("c", "x"), ("d", "d"), ("e", "hang"), ("f", "f")]
        assert pool.map(items) == [True, None, False, True, None, True]
        assert pool.killed_workers == 2
        assert pool.map([("z", "z")]) == [True]  # the replaced workers keep serving
    finally:
        pool.close()


def test_accuracy_from_a_non_main_thread():
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("v", score(["\\boxed{4}", "\\boxed{5}"], ["4", "4"])))
    t.start()
    t.join(120)
    assert result["v"] == [1.0, 0.0]


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not present")
def test_gsm8k_gold_solutions_verify_and_shuffled_pairs_do_not():
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    solutions = [r["answer"] for r in rows]
    own = score(solutions, golds)
    assert sum(v == 1.0 for v in own) / len(rows) >= 0.99
    rng = random.Random(0)
    shuffled = solutions[:]
    rng.shuffle(shuffled)
    pairs = [
        (s, g) for s, g in zip(shuffled, golds) if s.rsplit("####", 1)[1].strip().replace(",", "") != g.replace(",", "")
    ]  # same answer by chance is correct
    crossed = score([s for s, _ in pairs], [g for _, g in pairs])
    assert len(pairs) > 0.9 * len(rows)
    assert sum(v == 0.0 for v in crossed) / len(pairs) >= 0.99
