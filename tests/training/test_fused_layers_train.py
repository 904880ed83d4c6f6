"""fused_layers through a training run: the run logs the swaps, and trains the losses of the run without them."""

from __future__ import annotations

import logging

import pytest

from tests.training.helpers import LogMessages, logged_losses, train


def test_sft_with_fused_rms_norm_trains_the_same_losses(tiny_model_dir, sft_data, tmp_path):
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "cutoff_len": 64}
    train(tiny_model_dir, sft_data, tmp_path / "plain", fused_layers=False, **keys)
    messages = LogMessages()
    logging.getLogger("tunesmith").addHandler(messages)
    try:
        train(tiny_model_dir, sft_data, tmp_path / "fused", fused_layers=True, **keys)
    finally:
        logging.getLogger("tunesmith").removeHandler(messages)
    swapped = [m for m in messages.messages if m.startswith("fused layers:")]
    assert swapped == ["fused layers: 5 RMSNorm layers as torch's rms_norm (5 Qwen2RMSNorm); 2 MLPs as one "
                       "SwiGLU kernel each way"], messages.messages  # fmt: skip
    want, got = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "fused")
    assert len(got) == 3 and [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-4)
