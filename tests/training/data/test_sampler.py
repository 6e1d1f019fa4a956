"""PretrainSampler: paired ratio, determinism, rank split covering the epoch once, exact resume."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import DataError, PretrainSampler


def keys(sampler):
    return list(iter(sampler))


def test_ratio_size_and_keys():
    s = PretrainSampler(300, 700, batch_size=16, paired_ratio=0.7, seed=3)
    assert s.epoch_size == 992 and s.batches_per_epoch == 62  # 1000 rounded down to 16
    ks = keys(s)
    assert len(ks) == len(s) == 992 and all(e == 0 for e, _ in ks)
    idx = np.array([i for _, i in ks])
    assert (idx < 300).sum() == round(0.7 * 992) and idx.max() < 1000
    counts = np.bincount(idx[idx < 300], minlength=300)  # 694 draws from 300 pairs: 2 or 3 each
    assert counts.min() == 2 and counts.max() == 3
    assert np.bincount(idx[idx >= 300] - 300, minlength=700).max() == 1  # 298 of 700: no repeat


def test_without_pairs_everything_is_unpaired():
    s = PretrainSampler(0, 50, batch_size=10, paired_ratio=0.7)
    assert sorted(i for _, i in keys(s)) == list(range(50))


def test_deterministic_by_seed_and_epoch():
    a, b = PretrainSampler(20, 80, batch_size=4, seed=1), PretrainSampler(20, 80, batch_size=4, seed=1)
    assert keys(a) == keys(b)
    b.set_epoch(1)
    assert keys(b)[0][0] == 1 and [i for _, i in keys(b)] != [i for _, i in keys(a)]
    c = PretrainSampler(20, 80, batch_size=4, seed=2)
    assert [i for _, i in keys(c)] != [i for _, i in keys(a)]


@settings(max_examples=25, deadline=None)
@given(n_p=st.integers(0, 40), n_u=st.integers(1, 60), batch=st.integers(1, 5), world=st.integers(1, 4),
       epoch=st.integers(0, 3))
def test_ranks_split_the_global_order_exactly_once(n_p, n_u, batch, world, epoch):
    if batch * world > n_p + n_u:
        return
    samplers = [PretrainSampler(n_p, n_u, batch_size=batch, world_size=world, rank=r, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    shares = [keys(s) for s in samplers]
    assert len({len(sh) for sh in shares}) == 1
    single = PretrainSampler(n_p, n_u, batch_size=batch * world, seed=5)
    single.set_epoch(epoch)
    glob = keys(single)
    merged = [shares[r][k] for k in range(len(shares[0])) for r in range(world)]
    assert merged == glob  # the same global order whatever the world size, split by stride


def test_resume_continues_from_the_next_batch():
    full = PretrainSampler(10, 90, batch_size=8, world_size=2, rank=1, seed=4)
    full.set_epoch(2)
    everything = keys(full)
    run = PretrainSampler(10, 90, batch_size=8, world_size=2, rank=1, seed=4)
    run.set_epoch(2)
    run.advance(3)  # three optimizer steps done, then the checkpoint
    state = run.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3 * 8 * 2
    resumed = PretrainSampler(10, 90, batch_size=8, world_size=2, rank=1, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop's usual call keeps the restored position
    assert keys(resumed) == everything[3 * 8:] and len(resumed) == len(everything) - 24
    assert resumed.batches_done == 3
    resumed.advance(resumed.batches_per_epoch)
    resumed.set_epoch(3)
    assert len(resumed) == len(everything) and keys(resumed)[0][0] == 3


def test_resume_refuses_another_order():
    s = PretrainSampler(10, 90, batch_size=8, seed=4)
    s.advance(1)
    with pytest.raises(DataError, match="seed 4 -> 5"):
        PretrainSampler(10, 90, batch_size=8, seed=5).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="not a multiple of the global batch"):
        PretrainSampler(10, 90, batch_size=16, seed=4, epoch_size=96).load_state_dict(
            {**s.state_dict(), "epoch_size": 96})


def test_batch_larger_than_the_epoch():
    with pytest.raises(DataError, match=r"global batch \(32 x 2 rank\(s\) = 64\) is larger than the epoch \(50"):
        PretrainSampler(0, 50, batch_size=32, world_size=2)
