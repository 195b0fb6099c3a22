"""ResumableSampler: global order from (seed, epoch), exact resume across world sizes."""

from __future__ import annotations

import numpy as np
import pytest

from umbrella_ds.data import ResumableSampler


def global_stream(n, world, seed, consumed=0, state=None, gbs=None, steps=None):
    """Interleave the ranks' streams back into the global order they jointly consume."""
    samplers = [
        ResumableSampler(n, world_size=world, rank=r, seed=seed, global_batch_size=gbs)
        for r in range(world)
    ]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
        s.advance(consumed)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1, "ranks must get equal counts with drop_last"
    assert all(len(p) == len(s) for p, s in zip(per_rank, samplers))
    return [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(world)], samplers


def test_deterministic_from_seed_and_epoch():
    a = list(ResumableSampler(50, world_size=1, rank=0, seed=3))
    b = list(ResumableSampler(50, world_size=1, rank=0, seed=3))
    c = list(ResumableSampler(50, world_size=1, rank=0, seed=4))
    assert a == b and a != c
    assert sorted(i for _, i in a) == list(range(50))
    s = ResumableSampler(50, world_size=1, rank=0, seed=3)
    s.set_epoch(1)
    e1 = list(s)
    assert all(e == 1 for e, _ in e1) and [i for _, i in e1] != [i for _, i in a]


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 2), (2, 3), (4, 1), (1, 4)])
def test_resume_yields_exactly_the_remaining_sequence(world_before, world_after):
    n, seed, gbs = 96, 7, 12
    full, _ = global_stream(n, 1, seed, gbs=gbs)
    # Run: two optimizer steps of the global batch, then save.
    _, samplers = global_stream(n, world_before, seed, gbs=gbs)
    for s in samplers:
        s.advance(gbs)
        s.advance(gbs)
    state = samplers[0].state_dict()
    assert state == {"epoch": 0, "consumed": 2 * gbs, "seed": seed, "world_size": world_before}
    rest, resumed = global_stream(n, world_after, seed, state=state, gbs=gbs)
    assert rest == full[2 * gbs :]  # nothing repeated, nothing skipped
    assert resumed[0].state_dict()["world_size"] == world_after


def test_drop_last_is_across_the_global_batch():
    s = [ResumableSampler(50, world_size=2, rank=r, seed=0, global_batch_size=8) for r in (0, 1)]
    assert len(s[0]) == len(s[1]) == 24  # 48 of 50 served: 6 global batches of 8
    keep = ResumableSampler(50, world_size=3, rank=2, seed=0, drop_last=False)
    all_ranks = [
        i
        for r in range(3)
        for _, i in ResumableSampler(50, world_size=3, rank=r, seed=0, drop_last=False)
    ]
    assert sorted(all_ranks) == list(range(50)) and len(keep) == 16


def test_state_errors_and_epoch_rollover():
    s = ResumableSampler(20, world_size=2, rank=0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "consumed": 4, "seed": 2, "world_size": 2})
    with pytest.raises(ValueError, match="past the end"):
        s.advance(21)
    s.advance(20)
    assert s.exhausted and len(s) == 0
    s.set_epoch(0)  # same epoch keeps the position
    assert s.consumed == 20
    s.set_epoch(1)
    assert s.consumed == 0 and len(s) == 10
    np.testing.assert_array_equal(np.sort(s.global_order()), np.arange(20))
