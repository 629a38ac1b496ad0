"""The training prompt stream: a seeded order per epoch, resumable at any cursor."""

import random

from gdpo.data import PromptSet
from gdpo.trainer import PromptStream


def _reference(n: int, seed: int, cursor: int, k: int) -> list[int]:
    """The stream's definition, position by position: epoch e is range(n) shuffled by Random(f"{seed}/{e}")."""
    out = []
    for pos in range(cursor, cursor + k):
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def test_takes_follow_the_seeded_order_across_epochs_and_resumes():
    n = 23
    data = PromptSet([f"p{i}" for i in range(n)], {"answer": [str(i) for i in range(n)]})
    stream = PromptStream(data, seed=5)
    got, cursor = [], 0
    for k in (4, 7, 19, 23, 1, 30):  # crossing several epoch boundaries, some takes larger than an epoch
        got += [int(p[1:]) for p in stream.take(cursor, k).prompts]
        cursor += k
    assert got == _reference(n, 5, 0, cursor)
    fresh = PromptStream(data, seed=5)  # a resumed run starts a new stream at a cursor
    assert [int(p[1:]) for p in fresh.take(40, 9).prompts] == _reference(n, 5, 40, 9)
    assert sorted(got[:n]) == list(range(n))  # each epoch is a permutation
    assert got[:n] != got[n : 2 * n]  # reshuffled per epoch
    assert _reference(n, 6, 0, n) != got[:n]  # and per seed
