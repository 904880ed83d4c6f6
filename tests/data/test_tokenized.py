"""The tokenized dataset's per-row counts, read from its Arrow columns without Python loops over tokens."""

from __future__ import annotations

import numpy as np

from tunesmith.data.tokenized import TokenDataset, write_part


def test_trained_counts_are_each_rows_targets_after_its_first_token(tmp_path):
    rows = {
        "input_ids": [[1, 2, 3, 4], [5, 6], [7], [8, 9, 10]],
        "labels": [[1, 2, 3, 4], [-100, 6], [7], [-100, -100, 10]],
    }
    write_part(tmp_path / "part-0.arrow", rows)
    data = TokenDataset([tmp_path / "part-0.arrow"])
    counts = data.trained_counts()
    # the first label never counts (the token before it is another row's); -100 never does
    assert counts.tolist() == [3, 1, 0, 1]
    assert int(counts.sum()) == data.supervised_tokens()
    assert data.lengths().tolist() == [4, 2, 1, 3]
    assert counts.dtype == np.int64
    assert data.trained_counts(np.array([3, 0])).tolist() == [1, 3]  # only the rows asked for
    assert data.trained_counts(np.array([], dtype=np.int64)).tolist() == []
