"""fused_layers through a training run: the run logs the swaps, and trains the losses of the run without them."""

from __future__ import annotations

import logging

import pytest

from tests.training.helpers import logged_losses, train, tunesmith_messages


def test_sft_with_fused_rms_norm_trains_the_same_losses(tiny_model_dir, sft_data, tmp_path):
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "cutoff_len": 64}
    train(tiny_model_dir, sft_data, tmp_path / "plain", fused_layers=False, **keys)
    with tunesmith_messages() as messages:
        train(tiny_model_dir, sft_data, tmp_path / "fused", fused_layers=True, **keys)
    swapped = [m for m in messages if m.startswith("fused layers:")]
    assert swapped == ["fused layers: 5 RMSNorm layers as torch's rms_norm (5 Qwen2RMSNorm); 2 MLPs as one "
                       "SwiGLU kernel each way; 2 attentions with one RoPE kernel each way; their eager math runs (the kernels "
                       "need a CUDA device)"], messages  # fmt: skip
    want, got = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "fused")
    assert len(got) == 3 and [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-4)


@pytest.mark.parametrize(
    "setting,cuda,compiled,want",
    [(None, True, False, True), (None, False, False, False), (True, False, False, True),
     (False, True, False, False), (None, True, True, False), (True, True, True, False)],
)  # fmt: skip
def test_fused_layers_are_on_with_a_gpu_and_never_with_torch_compile(setting, cuda, compiled, want, caplog):
    from tunesmith.training.run_steps import fused_layers_wanted

    with caplog.at_level(logging.INFO, logger="tunesmith"):
        assert fused_layers_wanted(setting, cuda=cuda, compiled=compiled) is want
    said = "fused layers: off (torch_compile fuses these layers itself)" in caplog.text
    assert said == (compiled and setting is not False and (cuda or bool(setting)))


def test_ranks_swap_only_when_every_rank_holds_its_weights(monkeypatch, caplog):
    """A rank that loaded on the meta device would keep every class where the others swap them: in a process
    group the swaps happen only when the minimum over ranks says every rank holds real weights."""
    import torch
    import torch.distributed as dist

    from tunesmith.model import fused_layers

    assert fused_layers.all_ranks(True) and not fused_layers.all_ranks(False)  # no process group
    others = {"ok": 0}  # another rank's flag

    def all_reduce(flag, op=None):
        flag.copy_(torch.minimum(flag, torch.tensor([others["ok"]])))

    for name, value in {"is_initialized": lambda: True, "get_world_size": lambda: 2,
                        "get_backend": lambda: "gloo", "all_reduce": all_reduce}.items():  # fmt: skip
        monkeypatch.setattr(dist, name, value)
    assert not fused_layers.all_ranks(True)
    others["ok"] = 1
    assert fused_layers.all_ranks(True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    others["ok"] = 0
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        assert fused_layers.fuse_layers(model) is None
    assert "fused layers: off (a rank holds no weights at start" in caplog.text
