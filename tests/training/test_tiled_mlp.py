"""tiled_mlp_tokens: the same numbers as the untiled MLP (LoRA with dropout, full, checkpointing), the same
parameter names, less peak memory in backward, and the config's refusals."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.training.helpers import logged_losses, train
from tunesmith.model.compile import decoder_layers
from tunesmith.model.loader import enable_gradient_checkpointing
from tunesmith.model.tiled_mlp import TiledMLP, tile_mlps
from tunesmith.model.tuning import TuningOptions, apply_tuning


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while the mode is on (freed ones leave the count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


def _model(
    tiny_model_dir, method: str, *, tile: int | None, checkpointing: bool = False, dropout: float = 0.0
):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_tuning(
        model, TuningOptions(finetuning_type=method, lora_rank=4, lora_dropout=dropout)
    ).model
    if tile:
        assert tile_mlps(decoder_layers(model), tile) == model.config.num_hidden_layers
    return model.train()


def _loss_and_grads(model, ids):
    torch.manual_seed(1)  # the same dropout masks for both models
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("lora", True), ("full", False)])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(method, checkpointing, tiny_model_dir):
    ids = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    want = _loss_and_grads(_model(tiny_model_dir, method, tile=None, checkpointing=checkpointing), ids)
    tiled = _model(tiny_model_dir, method, tile=16, checkpointing=checkpointing)  # 120 tokens: 8 tiles
    got = _loss_and_grads(tiled, ids)
    torch.testing.assert_close(got[0], want[0])
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_replays_the_forwards_dropout_masks(checkpointing, tiny_model_dir, monkeypatch):
    """With LoRA dropout, each tile draws its own masks: the recomputing backward must give the gradient of
    exactly the forward that was run (the reference: the same tiles, kept by autograd)."""
    from tunesmith.model import tiled_mlp

    ids = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    got = _loss_and_grads(
        _model(tiny_model_dir, "lora", tile=16, checkpointing=checkpointing, dropout=0.3), ids
    )

    def kept(mlp, tile, x, *params):
        parts = [tiled_mlp._call(mlp, part) for part in x.reshape(-1, x.shape[-1]).split(tile)]
        return torch.cat(parts).view(*x.shape[:-1], -1)

    monkeypatch.setattr(tiled_mlp._Tiled, "apply", kept)
    want = _loss_and_grads(
        _model(tiny_model_dir, "lora", tile=16, checkpointing=checkpointing, dropout=0.3), ids
    )
    torch.testing.assert_close(got[0], want[0])
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=name)


def test_parameter_names_and_adapter_keys_do_not_change(tiny_model_dir):
    plain, tiled = _model(tiny_model_dir, "lora", tile=None), _model(tiny_model_dir, "lora", tile=16)
    assert list(tiled.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert isinstance(decoder_layers(tiled)[0].mlp, TiledMLP)
    tiled.eval()
    assert not decoder_layers(tiled)[0].mlp._mlp.training  # train()/eval() reach the wrapped MLP


def test_tiling_lowers_the_peak_memory_of_backward():
    """Two decoder layers with wide MLPs, 2,048 tokens: the MLP's [tokens x intermediate] tensors dominate."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def peak(tile: int | None) -> int:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, layer_types=["full_attention"] * 2)  # fmt: skip
        model = Qwen2ForCausalLM(config).train()
        if tile:
            tile_mlps(decoder_layers(model), tile)
        ids = torch.randint(0, 64, (1, 2048))
        with PeakBytes() as tracker:
            model.model(input_ids=ids, use_cache=False).last_hidden_state.square().mean().backward()
        return tracker.peak

    untiled, tiled = peak(None), peak(256)
    # untiled, backward holds gate, up, act(gate), their product and gradients: 2,048 x 1,024 fp32 each
    assert tiled < 0.5 * untiled, (tiled, untiled)


def test_sft_with_tiled_mlp_trains_the_same_losses(tiny_model_dir, sft_data, tmp_path):
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "cutoff_len": 64}
    train(tiny_model_dir, sft_data, tmp_path / "plain", **keys)
    train(tiny_model_dir, sft_data, tmp_path / "tiled", tiled_mlp_tokens=16, **keys)
    want, got = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "tiled")
    assert len(got) == 3 and [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-5)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"torch_compile": True}, "cannot be used with torch_compile"),
        ({"deepspeed": "zero2"}, "with DeepSpeed"),
    ],
)
def test_tiled_mlp_is_refused_with_compile_and_engines(extra, needle, tiny_model_dir, sft_data, tmp_path):
    from tests.training.helpers import run_config
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match=f"tiled_mlp_tokens.*{needle}"):
        load_config(None, run_config(tiny_model_dir, sft_data, tmp_path, tiled_mlp_tokens=512, **extra))
