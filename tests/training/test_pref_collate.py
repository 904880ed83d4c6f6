"""Fast tier: preference collators, KTO's mismatched KL pairs, per-row columns and the metric store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunesmith.data.collate_pref import KTOCollator, KTOPairs, PairwiseCollator, WithColumns, first_label
from tunesmith.training.preference import MetricStore

X = -100
PAIRS = [
    {"chosen_input_ids": [1, 2, 3], "chosen_labels": [X, X, 3], "rejected_input_ids": [1, 2, 4, 5],
     "rejected_labels": [X, X, 4, 5], "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
    {"chosen_input_ids": [6, 7], "chosen_labels": [X, 7], "rejected_input_ids": [6, 8],
     "rejected_labels": [X, 8], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
]  # fmt: skip
# prompt tokens are < 10, completion tokens >= 10
KTO_ROWS = [
    {"input_ids": [1, 2, 10, 11], "labels": [X, X, 10, 11], "kto_tag": True},
    {"input_ids": [3, 12], "labels": [X, 12], "kto_tag": False},
    {"input_ids": [4, 5, 6, 13], "labels": [X, X, X, 13], "kto_tag": True},
]


def test_pairwise_collator_puts_chosen_rows_first_and_pads():
    batch = PairwiseCollator(pad_token_id=0, pad_to_multiple_of=8)(PAIRS)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][:, :4].tolist() == [[1, 2, 3, 0], [6, 7, 0, 0], [1, 2, 4, 5], [6, 8, 0, 0]]
    assert batch["labels"][:, :4].tolist() == [[X, X, 3, X], [X, 7, X, X], [X, X, 4, 5], [X, 8, X, X]]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 2, 4, 2]
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]
    assert batch["use_cache"] is False


def test_first_label():
    assert first_label([X, X, 5, X]) == 2
    assert first_label([X, X]) == 2


def test_kto_pairs_join_each_prompt_with_the_next_rows_completion():
    pairs = KTOPairs(KTO_ROWS)
    assert len(pairs) == 3
    assert pairs[0]["kl_input_ids"] == [1, 2, 12]  # prompt of row 0, completion of row 1
    assert pairs[0]["kl_labels"] == [X, X, 12]
    assert pairs[1]["kl_input_ids"] == [3, 13]
    assert pairs[2]["kl_input_ids"] == [4, 5, 6, 10, 11]  # the last row wraps to the first
    assert pairs[2]["kl_labels"] == [X, X, X, 10, 11]
    assert pairs[0]["input_ids"] == KTO_ROWS[0]["input_ids"]  # the row itself is untouched


def test_kto_collator():
    batch = KTOCollator(pad_token_id=0)(list(KTOPairs(KTO_ROWS)))
    assert batch["input_ids"].shape == (3, 4)
    assert batch["kl_input_ids"].shape == (3, 5)
    assert batch["kto_tag"].tolist() == [True, False, True]
    assert batch["kl_attention_mask"].sum(-1).tolist() == [3, 2, 5]
    assert batch["kl_labels"][1].tolist() == [X, 13, X, X, X]


def test_with_columns_adds_per_row_values_and_checks_lengths():
    rows = WithColumns(KTO_ROWS, {"ref_logps": np.array([-1.0, -2.0, -3.0])})
    assert rows[1]["ref_logps"] == -2.0 and rows[1]["input_ids"] == [3, 12]
    batch = KTOCollator(pad_token_id=0)(list(KTOPairs(rows)))
    assert torch.equal(batch["ref_logps"], torch.tensor([-1.0, -2.0, -3.0]))
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        WithColumns(KTO_ROWS, {"ref_logps": np.array([1.0, 2.0])})


def test_metric_store_averages_per_split_and_prefixes_eval():
    store = MetricStore()
    store.add("train", {"rewards/margins": 1.0, "kl": 0.5})
    store.add("train", {"rewards/margins": 3.0})
    store.add("eval", {"rewards/margins": -1.0})
    logs = {"loss": 0.3}
    store.merge_into(logs)
    assert logs == {"loss": 0.3, "rewards/margins": 2.0, "kl": 0.5}
    eval_logs = {"eval_loss": 0.1}
    store.merge_into(eval_logs)
    assert eval_logs == {"eval_loss": 0.1, "eval_rewards/margins": -1.0}
    after = {"loss": 0.2}
    store.merge_into(after)  # cleared at each log
    assert after == {"loss": 0.2}
