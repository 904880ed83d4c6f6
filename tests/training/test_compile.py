"""torch_compile: decoder layers compiled in place train to the eager run's losses and save the same files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.training.helpers import LogMessages, load_safetensors, logged_losses, train
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.model.compile import NO_SIZE_GUARDS, compile_decoder_layers, compile_kwargs, decoder_layers


def _tiny(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_decoder_layers_are_found_under_peft_and_compiled_in_place(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    layers = decoder_layers(model)
    inner = model.base_model.model.model.layers
    assert len(layers) == len(inner) == model.config.num_hidden_layers
    assert all(a is b for a, b in zip(layers, inner, strict=True))
    names = list(model.state_dict())
    # LoRA freezes the embeddings: the first layer's input needs no gradient, so it stays eager
    assert compile_decoder_layers(model) == len(inner) - 1
    assert inner[0]._compiled_call_impl is None
    assert all(layer._compiled_call_impl is not None for layer in inner[1:])
    assert list(model.state_dict()) == names  # in place: no `_orig_mod.` in any key


def test_inductor_layers_compile_without_size_guards_in_any_mode(monkeypatch):
    """The mode becomes its inductor options, plus the option that keeps the token count unguarded; another
    backend, or a torch without the option, gets the mode as it is."""
    import torch._inductor.config as inductor_config

    # No skip when the option is missing: every torch tested (2.11 on the GPU, 2.13 on CI) has it, and one
    # that drops it must fail here, since the mid-run recompile it prevents would come back unnoticed.
    assert compile_kwargs(None, "inductor") == {"options": NO_SIZE_GUARDS}
    autotune = compile_kwargs("max-autotune", "inductor")["options"]
    assert autotune["max_autotune"] and autotune["triton.cudagraphs"]
    assert NO_SIZE_GUARDS.items() <= autotune.items()
    assert compile_kwargs("reduce-overhead", "aot_eager") == {"mode": "reduce-overhead"}
    monkeypatch.delattr(inductor_config.triton, "mix_order_reduction_non_strict_mode")
    assert compile_kwargs("max-autotune", "inductor") == {"mode": "max-autotune"}


def test_a_model_without_a_layer_stack_is_refused():
    with pytest.raises(TunesmithError, match="found no stack of decoder layers.*torch_compile: false"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("engine", [{"fsdp": "full_shard auto_wrap"}, {"deepspeed": "zero3"}])
def test_torch_compile_is_refused_with_sharded_engines_when_the_config_loads(engine):
    keys = [f"{k}={v}" for k, v in engine.items()]
    with pytest.raises(ConfigError, match="torch_compile.*set torch_compile: false"):
        load_config(None, ["torch_compile=true", *keys])


def test_compiled_lora_run_matches_eager_and_saves_the_same_adapter(
    monkeypatch, tiny_model_dir, sft_data, tmp_path
):
    """Packed and unpacked batches of changing lengths, gradient checkpointing on: one compile, same losses."""
    calls: list[dict] = []
    real_compile = torch.nn.Module.compile

    def recording(module, *args, **kwargs):
        calls.append(kwargs)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    common = dict(max_steps=4, packing=True, neat_packing=True, disable_gradient_checkpointing=False)
    torch.manual_seed(0)
    train(tiny_model_dir, sft_data, tmp_path / "eager", **common)
    torch.manual_seed(0)
    handler = LogMessages()
    logging.getLogger("tunesmith").addHandler(handler)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        train(tiny_model_dir, sft_data, tmp_path / "compiled", torch_compile=True, **common)
    finally:
        logging.getLogger("tunesmith").removeHandler(handler)
    assert any("torch_compile: 1 of 2 x Qwen2DecoderLayer compiled in place" in m for m in handler.messages)
    assert any("loss: fused" in m and "softmax compiled (inductor)" in m for m in handler.messages)
    # Two graphs for the run, the decoder layer's and the fused loss head's chunk math: not one per shape
    # (dynamic), none for the fused-loss probe (eager), none for the first layer (eager, its input needs no
    # gradient).
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not any("new graph(s) compiled" in m for m in handler.messages)  # no mid-run recompile
    assert calls == [{"backend": "inductor", "dynamic": True, **compile_kwargs(None, "inductor")}]
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3, 4]
    assert [x for _, x in compiled] == pytest.approx([x for _, x in eager], rel=1e-4)
    a = load_safetensors(tmp_path / "eager" / "adapter_model.safetensors")
    b = load_safetensors(tmp_path / "compiled" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:  # Adam at lr 1e-2 turns fused-kernel rounding into rare ~3e-4 steps on ~3e-2 weights
        torch.testing.assert_close(b[key], a[key], rtol=1e-2, atol=1e-3)
    # Transformers' own whole-model compile is not also applied: the key is consumed by tunesmith.
    resolved = (tmp_path / "compiled" / "tunesmith_config.yaml").read_text()
    assert "torch_compile: true" in resolved


def test_torch_compile_is_a_known_key():
    cfg = load_config(None, ["torch_compile=true", "torch_compile_mode=max-autotune-no-cudagraphs"])
    assert cfg.training.hf["torch_compile"] is True


@pytest.mark.parametrize(
    "mode,fix",
    [("reduce-overhead", "use torch_compile_mode: default"), ("max-autotune", "max-autotune-no-cudagraphs")],
)
def test_cuda_graph_modes_are_refused_when_the_config_loads(mode, fix):
    """Per-layer compiled training under CUDA graph trees crashed (a segfault, H200, torch 2.11): refused with
    the mode that keeps the kernels."""
    with pytest.raises(ConfigError, match=f"(?s)torch_compile_mode.*{mode}.*CUDA graphs.*{fix}"):
        load_config(None, ["torch_compile=true", f"torch_compile_mode={mode}"])
    for ok in ("default", "max-autotune-no-cudagraphs"):
        load_config(None, ["torch_compile=true", f"torch_compile_mode={ok}"])
    load_config(None, [f"torch_compile_mode={mode}"])  # without torch_compile the mode is not used


def test_other_modes_are_looked_up_in_the_installed_torch(monkeypatch):
    """A newer torch's mode is accepted, one that records CUDA graphs refused, an unknown one refused at load
    (not at the first step) with the usable ones; the cudagraphs backend is refused like the modes."""
    from tunesmith.model import compile as compiling

    modes = compiling.compile_modes("a mode tunesmith does not name")  # the real lookup: torch's own table
    assert modes["reduce-overhead"] and modes["max-autotune"] and not modes["default"]
    monkeypatch.setattr(
        compiling, "compile_modes", lambda mode: {"default": False, "new": False, "graphs": True}
    )
    load_config(None, ["torch_compile=true", "torch_compile_mode=new"])
    with pytest.raises(ConfigError, match="(?s)torch_compile_mode: graphs records CUDA graphs"):
        load_config(None, ["torch_compile=true", "torch_compile_mode=graphs"])
    with pytest.raises(
        ConfigError, match="(?s)'fastest' is not a mode of the installed torch.*allowed: default, new"
    ):
        load_config(None, ["torch_compile=true", "torch_compile_mode=fastest"])
    with pytest.raises(
        ConfigError, match="(?s)torch_compile_backend: cudagraphs records CUDA graphs.*inductor"
    ):
        load_config(None, ["torch_compile=true", "torch_compile_backend=cudagraphs"])
    load_config(None, ["torch_compile=true", "torch_compile_backend=aot_eager"])


def test_a_mid_run_recompile_is_reported_with_its_step(tiny_model_dir, sft_data, tmp_path):
    """16 rows in batches of 5: the 4th batch has one row, which dynamo specialises (CPU batches are padded
    rows, [rows, length]), so the compiled layers recompile during step 4, and the log says so."""
    handler = LogMessages()
    logging.getLogger("tunesmith").addHandler(handler)
    torch._dynamo.reset()
    try:
        train(tiny_model_dir, sft_data, tmp_path / "run", torch_compile=True, max_steps=4,
              per_device_train_batch_size=5, disable_gradient_checkpointing=True)  # fmt: skip
    finally:
        logging.getLogger("tunesmith").removeHandler(handler)
    notices = [m for m in handler.messages if "new graph(s) compiled" in m]
    assert len(notices) == 1 and "during step 4" in notices[0] and "TORCH_LOGS=recompiles" in notices[0]


def test_an_evaluations_own_graphs_are_not_blamed_on_the_next_step(tiny_model_dir, sft_data, tmp_path):
    """Evaluation after step 1 compiles graphs without gradients: said at info level. 12 training rows in
    batches of 11: step 2's one row recompiles, and only that step is warned about."""
    handler = LogMessages()
    logging.getLogger("tunesmith").addHandler(handler)
    torch._dynamo.reset()
    try:
        train(tiny_model_dir, sft_data, tmp_path / "run", torch_compile=True, max_steps=2, val_size=0.25,
              eval_strategy="steps", eval_steps=1, per_device_train_batch_size=11,
              per_device_eval_batch_size=4, disable_gradient_checkpointing=True)  # fmt: skip
    finally:
        logging.getLogger("tunesmith").removeHandler(handler)
    assert any("evaluation compiled" in m for m in handler.messages)
    notices = [m for m in handler.messages if "new graph(s) compiled" in m]
    assert len(notices) == 1 and "during step 2" in notices[0], notices
