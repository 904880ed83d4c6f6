"""Batches are built in worker processes on a GPU by default, and workers change no batch."""

from __future__ import annotations

from tests.training.helpers import logged_losses, train
from tunesmith.training.causal_lm import loader_workers


def test_gpu_runs_get_two_persistent_workers_unless_the_config_says():
    assert loader_workers({}, cuda=True, local_world_size=1) in (
        {"dataloader_num_workers": 2, "dataloader_persistent_workers": True},
        {"dataloader_num_workers": 1, "dataloader_persistent_workers": True},  # a 2-core machine
        {"dataloader_num_workers": 0, "dataloader_persistent_workers": False},  # a 1-core machine
    )
    assert loader_workers({}, cuda=True, local_world_size=10_000) == {
        "dataloader_num_workers": 0,
        "dataloader_persistent_workers": False,
    }
    assert loader_workers({}, cuda=False) == {}
    assert loader_workers({"dataloader_num_workers": 0}, cuda=True) == {}


def test_worker_processes_give_the_same_training(tiny_model_dir, sft_data, tmp_path):
    for workers in (0, 2):
        keys = {"dataloader_num_workers": workers, "max_steps": 6, "packing": True, "cutoff_len": 128}
        if workers:
            keys["dataloader_persistent_workers"] = True
        train(tiny_model_dir, sft_data, tmp_path / f"w{workers}", **keys)
    assert logged_losses(tmp_path / "w2") == logged_losses(tmp_path / "w0")
    assert len(logged_losses(tmp_path / "w0")) == 6
