"""Packing: bins never overflow, every document lands exactly once, documents keep their boundaries."""

from __future__ import annotations

import random

import pytest

from tunesmith.data.packing import IGNORE_INDEX, pack, packed_rows


def test_pack_small_example_and_determinism():
    assert pack([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert pack([8, 8, 1], 8) == [[0], [1], [2]]
    assert pack([], 8) == []
    lengths = [random.Random(1).randint(1, 100) for _ in range(500)]
    assert pack(lengths, 128) == pack(list(lengths), 128)


@pytest.mark.parametrize("seed", range(5))
def test_pack_invariants(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 512])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 800))]
    bins = pack(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) and b for b in bins)
    # best-fit decreasing is within 11/9 OPT + 1; the volume bound is a lower bound on OPT
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // capacity) + 1


def test_pack_rejects_documents_that_do_not_fit():
    with pytest.raises(ValueError, match="document 1 has length 9"):
        pack([3, 9], 8)
    with pytest.raises(ValueError, match="length 0"):
        pack([0], 8)


def test_packed_rows_keep_document_boundaries():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        "labels": [[IGNORE_INDEX, 2, 3], [4, 5], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]],
        "weights": [[0.0, 1.0, 1.0], [0.5, 0.5], [0.0, 0.0, 2.0, 2.0]],
    }
    bins = pack([3, 2, 4], 6)
    assert bins == [[1, 2], [0]]
    rows = packed_rows(examples, bins)
    assert rows["input_ids"] == [[4, 5, 6, 7, 8, 9], [1, 2, 3]]
    assert rows["labels"] == [[IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9], [IGNORE_INDEX, 2, 3]]
    assert rows["position_ids"] == [[0, 1, 0, 1, 2, 3], [0, 1, 2]]
    assert rows["seq_lens"] == [[2, 4], [3]]
    assert rows["weights"] == [[0.0, 0.5, 0.0, 0.0, 2.0, 2.0], [0.0, 1.0, 1.0]]


def test_packed_rows_invariants_on_random_documents():
    rng = random.Random(7)
    docs = [[rng.randint(3, 999) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    examples = {"input_ids": docs, "labels": [list(d) for d in docs]}
    rows = packed_rows(examples, pack([len(d) for d in docs], 64))
    assert "weights" not in rows
    assert sorted(map(tuple, docs)) == sorted(
        tuple(row[a : a + n])
        for row, lens in zip(rows["input_ids"], rows["seq_lens"])
        for a, n in _starts(lens)
    )
    for row_ids, labels, pos, lens in zip(
        rows["input_ids"], rows["labels"], rows["position_ids"], rows["seq_lens"]
    ):
        assert len(row_ids) == len(labels) == len(pos) == sum(lens) <= 64
        for a, n in _starts(lens):
            assert pos[a : a + n] == list(range(n)) and labels[a] == IGNORE_INDEX
            assert labels[a + 1 : a + n] == row_ids[a + 1 : a + n]


def _starts(lens: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in lens:
        out.append((a, n))
        a += n
    return out
