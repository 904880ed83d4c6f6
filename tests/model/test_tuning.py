"""What trains under full / freeze / lora, what peft receives, LoRA+ groups, and saved adapters that reload."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.model import (
    TuningOptions,
    apply_tuning,
    build_optimizer_param_groups,
    load_model,
    load_tokenizer,
    trainable_summary,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load(path, **kwargs):
    """The CPU defaults on any machine: fp32, no checkpointing, unless a test asks otherwise."""
    return load_model(path, **{"dtype": "fp32", "gradient_checkpointing": False, **kwargs})


@pytest.fixture
def model(tiny_model_dir):
    return _load(tiny_model_dir).model


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _numel(model: nn.Module, names: set[str]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train_step(model: nn.Module, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """One AdamW step; returns every parameter's value from before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(build_optimizer_param_groups(model, lr))
    loss = model(**_batch()).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    return before


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_full_trains_everything(model):
    result = apply_tuning(model, TuningOptions(finetuning_type="full"))
    assert result.trainable_params == result.all_params == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("layers", "trained_layer"), [(1, 1), (-1, 0)])
def test_freeze_trains_last_or_first_layers(model, layers, trained_layer):
    result = apply_tuning(model, TuningOptions(finetuning_type="freeze", freeze_trainable_layers=layers))
    expected = {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{trained_layer}.")}
    assert _trainable(model) == expected
    assert result.trainable_params == _numel(model, expected)
    assert len(expected) == 12  # 7 linear weights, q/k/v biases, 2 norms
    assert result.trainable_params < result.all_params


def test_freeze_named_and_extra_modules(model):
    options = TuningOptions(
        finetuning_type="freeze",
        freeze_trainable_layers=2,
        freeze_trainable_modules=("mlp",),
        freeze_extra_modules=("norm",),
    )
    apply_tuning(model, options)
    expected = {
        f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert _trainable(model) == expected | {"model.norm.weight"}


def test_freeze_with_new_tokens_trains_embeddings_and_head(model):
    apply_tuning(
        model,
        TuningOptions(
            finetuning_type="freeze", freeze_trainable_layers=1, freeze_trainable_modules=("self_attn",)
        ),
        train_embedding_modules=("embed_tokens", "lm_head"),
    )
    trainable = _trainable(model)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= trainable
    assert all(
        n.startswith("model.layers.1.self_attn.")
        for n in trainable - {"model.embed_tokens.weight", "lm_head.weight"}
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            TuningOptions(finetuning_type="freeze", freeze_trainable_layers=0),
            "freeze_trainable_layers: got 0",
        ),
        (
            TuningOptions(finetuning_type="freeze", freeze_trainable_layers=3),
            "freeze_trainable_layers: got 3",
        ),
        (TuningOptions(finetuning_type="freeze", freeze_trainable_modules=("mlpp",)), "mlpp not found.*mlp"),
        (TuningOptions(finetuning_type="freeze", freeze_extra_modules=("head",)), "head not found.*lm_head"),
        (TuningOptions(lora_target=("qproj",)), "lora_target: qproj not found.*q_proj"),
        (TuningOptions(additional_target=("nope",)), "additional_target: nope not found"),
        (TuningOptions(lora_rank=0), "lora_rank: got 0"),
        (TuningOptions(finetuning_type="prefix"), "unknown value 'prefix'"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_are_clear_errors(model, options, message):
    with pytest.raises(TunesmithError, match=message):
        apply_tuning(model, options)


def test_quantized_models_only_take_lora(model):
    with pytest.raises(TunesmithError, match="cannot train a quantized model"):
        apply_tuning(model, TuningOptions(finetuning_type="freeze"), quantized=True)


def test_lora_all_wraps_every_linear_but_the_head(model):
    linears = {
        n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    result = apply_tuning(model, TuningOptions(lora_rank=4))
    peft_model = result.model
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert wrapped == set(linears) - {"lm_head"}
    assert len(wrapped) == 14
    assert result.lora_targets == tuple(sorted(LINEARS))
    assert result.trainable_params == sum(4 * (i + o) for n, (i, o) in linears.items() if n != "lm_head")
    assert all(("lora_A" in n or "lora_B" in n) for n in _trainable(peft_model))
    assert peft_model.peft_config["default"].lora_alpha == 8


def test_lora_explicit_targets_and_additional_target(model):
    options = TuningOptions(lora_target=("all",), additional_target=("o_proj",))
    result = apply_tuning(model, options)
    config = result.model.peft_config["default"]
    assert "o_proj" not in config.target_modules
    assert config.modules_to_save == ["o_proj"]
    assert any(n.endswith("o_proj.modules_to_save.default.weight") for n in _trainable(result.model))

    other = apply_tuning(_load(model.name_or_path).model, TuningOptions(lora_target=("q_proj", "v_proj")))
    assert set(other.model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        (TuningOptions(use_dora=True), "use_dora", True),
        (TuningOptions(use_rslora=True), "use_rslora", True),
        (TuningOptions(pissa_init=True), "init_lora_weights", "pissa_niter_16"),
        (TuningOptions(pissa_init=True, pissa_iter=-1), "init_lora_weights", "pissa"),
    ],
)
def test_lora_variants_reach_peft(model, options, field, value):
    base_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = apply_tuning(model, options)
    assert getattr(result.model.peft_config["default"], field) == value
    if options.use_dora:
        assert any("lora_magnitude_vector" in n for n in _trainable(result.model))
    if options.pissa_init:
        # PiSSA moves the top singular directions into the adapter: the base keeps only the residual.
        assert not torch.equal(
            result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q
        )


def test_training_step_changes_trainable_weights_only(tiny_model_dir):
    loaded = _load(tiny_model_dir, gradient_checkpointing=True)
    options = TuningOptions(finetuning_type="freeze", freeze_trainable_layers=1)
    model = apply_tuning(loaded.model, options).model
    before = _train_step(model)
    assert _changed(model, before) == _trainable(model)

    lora = apply_tuning(_load(tiny_model_dir, gradient_checkpointing=True).model, TuningOptions()).model
    before = _train_step(lora)
    changed = _changed(lora, before)
    # AdamW moves every lora_B (zero at init); lora_A moves once B is non-zero, so from step two.
    assert changed and changed <= _trainable(lora)
    assert {n for n in _trainable(lora) if "lora_B" in n} <= changed


def test_loraplus_groups(model):
    result = apply_tuning(model, TuningOptions())
    groups = build_optimizer_param_groups(result.model, lr=1e-4, loraplus_lr_ratio=16.0, weight_decay=0.1)
    names = {id(p): n for n, p in result.model.named_parameters()}
    for group in groups:
        is_b = {"lora_B" in names[id(p)] for p in group["params"]}
        assert len(is_b) == 1
        assert group["lr"] == pytest.approx(1.6e-3 if is_b.pop() else 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(_trainable(result.model))

    full = apply_tuning(_load(model.name_or_path).model, TuningOptions(finetuning_type="full")).model
    groups = build_optimizer_param_groups(full, lr=1e-4, weight_decay=0.1)
    names = {id(p): n for n, p in full.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == {n for n, p in full.named_parameters() if n.endswith(("norm.weight", "bias"))}
    assert {g["lr"] for g in groups} == {1e-4}


def test_new_tokens_put_embeddings_and_head_in_modules_to_save(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, new_special_tokens=["<|tool|>"])
    loaded = _load(tiny_model_dir, tokenizer=tokenizer, resize_vocab=True)
    result = apply_tuning(
        loaded.model, TuningOptions(), train_embedding_modules=loaded.train_embedding_modules
    )
    assert result.modules_to_save == ("embed_tokens", "lm_head")
    assert result.model.peft_config["default"].modules_to_save == ["embed_tokens", "lm_head"]
    assert "lm_head" not in result.lora_targets
    result.model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (len(tokenizer), 64)
    assert saved["base_model.model.lm_head.weight"].shape == (len(tokenizer), 64)


def test_tied_embeddings_stay_tied_with_new_tokens():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    tied = Qwen2ForCausalLM(config)
    result = apply_tuning(tied, TuningOptions(), train_embedding_modules=("embed_tokens", "lm_head"))
    assert result.model.peft_config["default"].ensure_weight_tying
    inner = result.model.base_model.model
    assert (
        inner.lm_head.modules_to_save["default"].weight
        is inner.model.embed_tokens.modules_to_save["default"].weight
    )


def _perturb_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))


def test_continue_from_saved_adapter(tmp_path, tiny_model_dir):
    first = apply_tuning(
        _load(tiny_model_dir).model, TuningOptions(lora_rank=4, lora_target=("q_proj",))
    ).model
    _perturb_lora(first)
    first.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}

    options = TuningOptions(adapter_name_or_path=(str(tmp_path / "adapter"),))
    result = apply_tuning(_load(tiny_model_dir).model, options)
    assert result.lora_targets == ("q_proj",)
    resumed = dict(result.model.named_parameters())
    assert set(saved) == _trainable(result.model)
    assert all(torch.equal(resumed[n], v) for n, v in saved.items())

    new = apply_tuning(_load(tiny_model_dir).model, replace(options, create_new_adapter=True))
    assert new.lora_targets == tuple(sorted(LINEARS))
    merged_q = new.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    plain_q = _load(tiny_model_dir).model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged_q, plain_q)  # the old adapter was merged into the base


def test_saved_adapter_loads_with_plain_peft_and_generates(tmp_path, tiny_model_dir):
    model = apply_tuning(_load(tiny_model_dir).model, TuningOptions(lora_rank=4)).model
    _train_step(model)
    _train_step(model)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = _batch(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)
        out = reloaded.generate(input_ids=batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


def test_fp16_trainable_params_become_fp32(tiny_model_dir):
    loaded = _load(tiny_model_dir, dtype="fp16")
    result = apply_tuning(loaded.model, TuningOptions(finetuning_type="freeze", freeze_trainable_layers=1))
    assert result.upcast_to_fp32 and set(result.upcast_to_fp32) == _trainable(result.model)
    dtypes = {n: p.dtype for n, p in result.model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in _trainable(result.model))
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.float16

    lora = apply_tuning(_load(tiny_model_dir, dtype="fp16").model, TuningOptions()).model
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}


def test_trainable_summary_format(model):
    apply_tuning(model, TuningOptions(finetuning_type="freeze", freeze_trainable_layers=1))
    summary = trainable_summary(model)
    match = re.fullmatch(r"trainable params: ([\d,]+) / ([\d,]+) \((\d+\.\d)%\)", summary)
    assert match
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert float(match.group(3)) == round(100 * trainable / total, 1)


def test_qlora_keeps_the_frozen_16bit_weights_in_their_dtype(tiny_model_dir):
    """Only the adapters train; embeddings, head and norms stay bf16 (peft's kbit preparation would make
    them fp32: 2 GiB more for an 8B Llama); the 4-bit layers stay 4-bit."""
    from tunesmith.model.loader import bnb_config

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
        quantization_config=bnb_config(4, torch.bfloat16),
    )
    model = apply_tuning(base, TuningOptions(lora_rank=4), quantized=True).model
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert frozen["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert frozen["base_model.model.lm_head.weight"] == torch.bfloat16
    assert frozen["base_model.model.model.norm.weight"] == torch.bfloat16
    assert type(model.base_model.model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
