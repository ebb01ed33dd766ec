"""Dataset-aware samplers: target frequencies, determinism, rank shards, exact resume."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from damex.data.samplers import (
    DatasetAwareSampler,
    InferenceSampler,
    dataset_weights,
    repeat_factors,
)

SIZES = [1000, 100, 10]
OFFSETS = [0, 1000, 1100]


def _dataset_of(i: int) -> int:
    return 0 if i < 1000 else (1 if i < 1100 else 2)


def _flat(sampler) -> list[int]:
    return [i for b in sampler for i in b]


def _frequencies(indices: list[int]) -> list[float]:
    c = Counter(_dataset_of(i) for i in indices)
    return [c[d] / len(indices) for d in range(3)]


def test_dataset_weights_closed_forms():
    assert dataset_weights(SIZES, "proportional") == pytest.approx(
        [1000 / 1110, 100 / 1110, 10 / 1110]
    )
    assert dataset_weights(SIZES, "uniform") == pytest.approx([1 / 3] * 3)
    raw = [math.sqrt(n) for n in SIZES]
    assert dataset_weights(SIZES, "temperature", 2.0) == pytest.approx([r / sum(raw) for r in raw])


def test_proportional_is_a_permutation_of_the_concatenation():
    s = DatasetAwareSampler(SIZES, mode="proportional", batch_size=1, seed=3)
    idx = _flat(s)
    assert sorted(idx) == list(range(1110))
    assert idx != list(range(1110))


@pytest.mark.parametrize(
    ("mode", "temperature"), [("uniform", 2.0), ("temperature", 2.0), ("temperature", 1.0)]
)
def test_empirical_dataset_frequencies_match_target(mode, temperature):
    s = DatasetAwareSampler(
        SIZES, mode=mode, temperature=temperature, num_samples=3000, batch_size=2, seed=1
    )
    idx = _flat(s)
    assert len(idx) == 3000
    target = dataset_weights(SIZES, mode, temperature)
    # stratified counts: off by at most one sample per dataset
    for got, want in zip(_frequencies(idx), target):
        assert abs(got - want) <= 1 / 3000 + 1e-12
    # within a dataset the draws are a cycled permutation: no image repeats before all are seen
    counts = Counter(idx)
    for d, n in enumerate(SIZES):
        per_image = [counts.get(OFFSETS[d] + j, 0) for j in range(n)]
        assert max(per_image) - min(per_image) <= 1


def test_uniform_over_many_epochs_is_not_biased_inside_small_dataset():
    s = DatasetAwareSampler(SIZES, mode="uniform", num_samples=300, batch_size=4, seed=0)
    seen = Counter()
    for e in range(4):
        s.set_epoch(e)
        seen.update(i for i in _flat(s) if i >= 1100)
    # 4 epochs x 100 draws of the 10-image dataset -> every image 40 times exactly (cycled perms)
    assert set(seen.values()) == {40}


def test_repeat_factor_closed_form_and_frequency():
    labels = [[0]] * 90 + [[1]] * 9 + [[1, 2]]  # f(0)=.9, f(1)=.1, f(2)=.01
    r = repeat_factors(labels, threshold=0.04)
    assert r[0] == pytest.approx(1.0)
    assert r[90] == pytest.approx(1.0)  # sqrt(.04/.1) < 1
    assert r[99] == pytest.approx(2.0)  # sqrt(.04/.01)
    assert repeat_factors([[]], 0.5) == [1.0]
    # fractional factors: stochastic rounding has the right mean over epochs
    factors = [1.0] * 100 + [2.5] * 10
    s = DatasetAwareSampler(
        [100, 10], mode="repeat_factor", repeat_factors=factors, batch_size=1, seed=0
    )
    total = Counter()
    lengths = []
    for e in range(40):
        s.set_epoch(e)
        idx = _flat(s)
        lengths.append(len(idx))
        total.update(idx)
    assert all(total[i] == 40 for i in range(100))
    small = sum(total[i] for i in range(100, 110)) / (40 * 10)
    assert abs(small - 2.5) < 0.1  # sd of the mean ~ 0.5/sqrt(400) = 0.025
    assert len(set(lengths)) > 1  # epoch length follows the rounding


def test_repeat_factor_mode_validates_length():
    with pytest.raises(ValueError, match="one repeat factor per image"):
        DatasetAwareSampler([3, 2], mode="repeat_factor", repeat_factors=[1.0, 2.0])


def test_same_seed_and_epoch_same_order_other_epoch_differs():
    a = DatasetAwareSampler(SIZES, mode="uniform", batch_size=2, seed=7)
    b = DatasetAwareSampler(SIZES, mode="uniform", batch_size=2, seed=7)
    assert list(a) == list(b) == list(a)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    c = DatasetAwareSampler(SIZES, mode="uniform", batch_size=2, seed=8)
    assert list(c) != first


@pytest.mark.parametrize("homogeneous", [False, True])
def test_rank_shards_disjoint_and_equal_length(homogeneous):
    ws = 3
    shards = [
        list(
            DatasetAwareSampler(
                SIZES,
                mode="proportional",
                batch_size=4,
                rank=r,
                world_size=ws,
                seed=5,
                homogeneous_batches=homogeneous,
            )
        )
        for r in range(ws)
    ]
    assert len({len(s) for s in shards}) == 1
    assert len(DatasetAwareSampler(SIZES, batch_size=4, rank=1, world_size=ws)) == len(shards[1])
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))  # no index on two ranks
    assert all(len(b) == 4 for s in shards for b in s)
    # sharding is a partition of the single-process global order
    single = list(
        DatasetAwareSampler(
            SIZES, mode="proportional", batch_size=4, seed=5, homogeneous_batches=homogeneous
        )
    )
    interleaved = [shards[j % ws][j // ws] for j in range(len(shards[0]) * ws)]
    assert interleaved == single[: len(interleaved)]


def test_drop_last_false_pads_ranks_and_keeps_partial_batch():
    shards = [
        list(DatasetAwareSampler([7], batch_size=2, rank=r, world_size=3, drop_last=False))
        for r in range(3)
    ]
    # 4 batches (last of size 1) over 3 ranks -> 2 each, padded by wrap-around
    assert [len(s) for s in shards] == [2, 2, 2]
    assert sorted(len(b) for s in shards for b in s) == [1, 2, 2, 2, 2, 2]
    assert set(i for s in shards for b in s for i in b) == set(range(7))


def test_homogeneous_batches_are_single_dataset():
    s = DatasetAwareSampler(
        SIZES, mode="uniform", batch_size=3, homogeneous_batches=True, seed=2, num_samples=900
    )
    batches = list(s)
    assert all(len({_dataset_of(i) for i in b}) == 1 for b in batches)
    assert len({_dataset_of(b[0]) for b in batches}) == 3
    # batch order mixes datasets (not all of dataset 0 first)
    firsts = [_dataset_of(b[0]) for b in batches[:30]]
    assert len(set(firsts)) > 1


@pytest.mark.parametrize("mode", ["proportional", "uniform", "temperature"])
def test_resume_mid_epoch_continues_identical_sequence(mode):
    kw = dict(mode=mode, batch_size=2, seed=11, rank=1, world_size=2, num_samples=200)
    ref = DatasetAwareSampler(SIZES, **kw)
    ref.set_epoch(3)
    full = list(ref)
    run = DatasetAwareSampler(SIZES, **kw)
    run.set_epoch(3)
    it = iter(run)
    head = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state["epoch"] == 3 and state["global_batches_consumed"] == 14
    resumed = DatasetAwareSampler(SIZES, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's usual call keeps the resume position
    assert head + list(resumed) == full
    # after the resumed epoch, the next epoch starts from the beginning
    resumed.set_epoch(4)
    ref.set_epoch(4)
    assert list(resumed) == list(ref)


def test_resume_with_other_world_size_covers_the_rest_of_the_epoch():
    kw = dict(mode="proportional", batch_size=2, seed=4)
    two = [DatasetAwareSampler([40], rank=r, world_size=2, **kw) for r in range(2)]
    its = [iter(s) for s in two]
    done = [next(it) for _ in range(3) for it in its]
    state = two[0].state_dict()
    assert state["global_batches_consumed"] == 6
    one = DatasetAwareSampler([40], rank=0, world_size=1, **kw)
    one.load_state_dict(state)
    rest = list(one)
    assert sorted(i for b in done + rest for i in b) == list(range(40))


def test_load_state_dict_rejects_changed_seed():
    s = DatasetAwareSampler(SIZES, seed=1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed"):
        DatasetAwareSampler(SIZES, seed=2).load_state_dict(state)


def test_mark_consumed_overrides_prefetch_count():
    s = DatasetAwareSampler([20], batch_size=2)
    it = iter(s)
    for _ in range(5):  # a prefetching loader pulled 5 batches ...
        next(it)
    s.mark_consumed(2)  # ... but delivered 2
    assert s.state_dict()["global_batches_consumed"] == 2


def test_inference_sampler_contiguous_each_index_once():
    shards = [list(InferenceSampler(10, rank=r, world_size=4)) for r in range(4)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(InferenceSampler(10, rank=r, world_size=4)) for r in range(4)] == [3, 3, 2, 2]
    assert list(InferenceSampler(2, rank=3, world_size=4)) == []


