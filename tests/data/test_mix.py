"""mix: concat / interleave plans (equal to HF datasets for the same seed), sampling and the val split."""

from __future__ import annotations

from collections import Counter

import pytest

from tunesmith.data.mix import dataset_indices, mix_plan, sample_indices, split_indices
from tunesmith.errors import DataError


def test_concat_keeps_order():
    assert mix_plan([2, 0, 3], "concat") == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]


def test_round_robin_under_and_over():
    assert mix_plan([2, 3], "interleave_under") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert mix_plan([2, 3], "interleave_over") == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 2)]


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
def test_probabilities_are_deterministic_and_stop_right(strategy):
    sizes, probs = [50, 200, 30], [0.2, 0.5, 0.3]
    plan = mix_plan(sizes, strategy, probs, seed=3)
    assert plan == mix_plan(sizes, strategy, probs, seed=3)
    assert plan != mix_plan(sizes, strategy, probs, seed=4)
    counts = Counter(d for d, _ in plan)
    assert all(0 <= r < sizes[d] for d, r in plan)
    if strategy == "interleave_under":
        # stops right after the first dataset runs out: exactly one dataset fully used, none repeated
        assert sum(counts[d] == sizes[d] for d in range(3)) == 1
        assert all(counts[d] <= sizes[d] for d in range(3)) and len(set(plan)) == len(plan)
        d_last = plan[-1][0]
        assert counts[d_last] == sizes[d_last]
    else:
        # goes on until every dataset was seen in full; the last draw completes the last dataset
        assert all({r for d2, r in plan if d2 == d} == set(range(sizes[d])) for d in range(3))
        d_last = plan[-1][0]
        assert counts[d_last] == sizes[d_last]


@pytest.mark.parametrize(
    ("strategy", "stopping"), [("interleave_under", "first_exhausted"), ("interleave_over", "all_exhausted")]
)
@pytest.mark.parametrize("probs", [None, [0.7, 0.2, 0.1]])
def test_matches_hf_interleave_datasets(strategy, stopping, probs):
    datasets = pytest.importorskip("datasets")
    sizes = [40, 7, 25]
    parts = [datasets.Dataset.from_dict({"d": [d] * n, "r": list(range(n))}) for d, n in enumerate(sizes)]
    hf = datasets.interleave_datasets(parts, probabilities=probs, seed=11, stopping_strategy=stopping)
    assert mix_plan(sizes, strategy, probs, seed=11) == list(zip(hf["d"], hf["r"]))


def test_zero_probability_and_bad_probs():
    plan = mix_plan([5, 5], "interleave_under", [1.0, 0.0], seed=0)
    assert plan == [(0, r) for r in range(5)]
    with pytest.raises(DataError, match="never exhausted"):
        mix_plan([5, 5], "interleave_over", [1.0, 0.0], seed=0)
    with pytest.raises(DataError, match="one probability per dataset"):
        mix_plan([5, 5], "interleave_under", [1.0], seed=0)
    with pytest.raises(DataError, match="empty dataset"):
        mix_plan([5, 0], "interleave_under")
    with pytest.raises(DataError, match="unknown mix strategy"):
        mix_plan([5], "shuffle")  # type: ignore[arg-type]


def test_sample_indices_sub_and_oversampling():
    sub = sample_indices(100, 10, seed=1)
    assert len(sub) == 10 == len(set(sub)) and sub == sorted(sub) and sub == sample_indices(100, 10, seed=1)
    assert sub != sample_indices(100, 10, seed=2)
    over = sample_indices(4, 10, seed=1)
    counts = Counter(over)
    assert len(over) == 10 and set(counts) == {0, 1, 2, 3}
    assert sorted(counts.values()) == [2, 2, 3, 3]  # every row twice, two rows a third time
    assert sample_indices(5, 5, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError):
        sample_indices(0, 3, seed=0)


def test_dataset_indices_caps_after_sampling():
    assert dataset_indices(10, max_samples=3) == [0, 1, 2]
    assert dataset_indices(10, num_samples=6, max_samples=4, seed=5) == sample_indices(10, 6, 5)[:4]
    assert dataset_indices(3, max_samples=10) == [0, 1, 2]


def test_split_counts_disjoint_and_deterministic():
    train, val = split_indices(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90 and sorted(train + val) == list(range(100))
    assert (train, val) == split_indices(100, 0.1, seed=0)
    assert val != split_indices(100, 0.1, seed=1)[1]
    assert len(split_indices(10, 0.25, seed=0)[1]) == 3  # rounded up, like HF train_test_split
    assert len(split_indices(10, 4, seed=0)[1]) == 4
    assert len(split_indices(10, 4.0, seed=0)[1]) == 4  # LLaMA-Factory: val_size > 1 is a count


@pytest.mark.parametrize("val_size", [10, 12, 0, 1.5, 0.0, -0.2, 0.999, True])
def test_split_rejects_impossible_sizes(val_size):
    with pytest.raises(DataError, match="val_size"):
        split_indices(10, val_size, seed=0)
