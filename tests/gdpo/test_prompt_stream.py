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


def test_rollouts_ahead_in_a_checkpoint_come_back_with_their_prompts_within_the_staleness_bound(tmp_path):
    """A checkpoint at step 4 kept the sampled rollouts of steps 4 and 5 (trainer.max_staleness=2): resumed,
    each comes back with the prompts the stream gives that step; a smaller bound keeps only those within
    it, and trainer.steps ends them."""
    import dataclasses
    import json

    from gdpo.config import load_config
    from gdpo.records import RolloutBatch
    from gdpo.trainer import AHEAD_FILE, RunState, load_rollouts_ahead

    n, per_step = 23, 3
    stream = PromptStream(PromptSet([f"p{i}" for i in range(n)], {"answer": [str(i) for i in range(n)]}), seed=5)
    state = RunState(step=4, cursor=4 * per_step, version=4)

    def batch(version):
        return RolloutBatch([[1]], [[2, 3]], ["x"], ["stop"], [[-0.5, -0.25]], [0], version, seconds=1.0)

    rows = [{"step": 4, "batch": dataclasses.asdict(batch(2))}, {"step": 5, "batch": dataclasses.asdict(batch(3))}]
    (tmp_path / AHEAD_FILE).write_text(json.dumps(rows))
    got = load_rollouts_ahead(tmp_path, stream, state, per_step, load_config(None, ["trainer.max_staleness=2"]))
    assert [r.step for r in got] == [4, 5] and got[1].batch == batch(3)
    assert got[1].prompts.prompts == stream.take(5 * per_step, per_step).prompts
    assert got[0].collect(cluster=None) is got[0].batch  # already sampled: nothing to collect
    one = load_rollouts_ahead(tmp_path, stream, state, per_step, load_config(None, ["trainer.max_staleness=1"]))
    assert one == []  # step 4's batch is 2 versions old: past the bound of 1, it is sampled again
    short = load_config(None, ["trainer.max_staleness=2", "trainer.steps=5"])
    assert [r.step for r in load_rollouts_ahead(tmp_path, stream, state, per_step, short)] == [4]
    assert load_rollouts_ahead(None, stream, state, per_step, short) == []
