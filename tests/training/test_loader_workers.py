"""Batches are built in worker processes on a GPU by default, and workers change no batch."""

from __future__ import annotations

from tests.training.helpers import logged_losses, train
from tunesmith.training.causal_lm import data_loading


def test_gpu_runs_get_workers_and_non_blocking_copies_unless_the_config_says():
    got = data_loading({}, cuda=True, local_world_size=1)
    assert got["dataloader_num_workers"] in (0, 1, 2)  # 2, less on a machine with fewer than 3 cores
    assert got["dataloader_persistent_workers"] == (got["dataloader_num_workers"] > 0)
    assert got["accelerator_config"] == {"non_blocking": True}
    crowded = data_loading({}, cuda=True, local_world_size=10_000)
    assert crowded["dataloader_num_workers"] == 0 and not crowded["dataloader_persistent_workers"]
    assert data_loading({}, cuda=False) == {}
    mine = {"dataloader_num_workers": 0, "accelerator_config": {"split_batches": True}}
    assert data_loading(mine, cuda=True) == {}
    assert "accelerator_config" not in data_loading({"dataloader_pin_memory": False}, cuda=True)


def test_transformers_takes_the_gpu_settings(tmp_path):
    """The keys are TrainingArguments' own (checked here on CPU, where tunesmith does not set them)."""
    from transformers import TrainingArguments

    keys = data_loading({}, cuda=True)
    args = TrainingArguments(output_dir=str(tmp_path), **keys)
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory
    assert args.dataloader_num_workers == keys["dataloader_num_workers"]


def test_worker_processes_give_the_same_training(tiny_model_dir, sft_data, tmp_path):
    for workers in (0, 2):
        keys = {"dataloader_num_workers": workers, "max_steps": 6, "packing": True, "cutoff_len": 128}
        if workers:
            keys["dataloader_persistent_workers"] = True
        train(tiny_model_dir, sft_data, tmp_path / f"w{workers}", **keys)
    assert logged_losses(tmp_path / "w2") == logged_losses(tmp_path / "w0")
    assert len(logged_losses(tmp_path / "w0")) == 6
