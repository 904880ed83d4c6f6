"""The tiny model builder and the loader: dtype, attention, checkpointing, quantization and vocab choices."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.errors import TunesmithError
from tunesmith.model.loader import load_model, load_tokenizer, resolve_attn, resolve_dtype
from tunesmith.tiny import tiny_tokenizer_dir
from tunesmith.tiny_model import build_tiny_model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_model_is_deterministic_small_and_fast(tmp_path, tiny_model_dir):
    start = time.perf_counter()
    again = build_tiny_model(tmp_path / "again")
    elapsed = time.perf_counter() - start
    assert _files(again) == _files(tiny_model_dir)
    assert elapsed < 1.0
    assert sum(len(b) for b in _files(again).values()) < 4 * 2**20
    other = load_file(build_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    base = load_file(again / "model.safetensors")
    assert not torch.equal(other["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_tiny_model_config_matches_its_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["vocab_size"] == len(tokenizer)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        2,
        4,
        2,
    )
    assert generation["eos_token_id"] == [im_end]
    # The tokenizer files are byte copies, so the tiny model's tokenizer is the shipped one exactly.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).read_bytes() == (tiny_tokenizer_dir() / name).read_bytes()


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_pads_right_and_falls_back_to_eos(tmp_path, tiny_model_dir, caplog):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<|endoftext|>"

    # Tokenizer files only: transformers would take the pad id from the model's config.json.
    no_pad = tmp_path / "no_pad"
    shutil.copytree(tiny_model_dir, no_pad, ignore=shutil.ignore_patterns("config.json", "model.*"))
    cfg = json.loads((no_pad / "tokenizer_config.json").read_text())
    del cfg["pad_token"]
    cfg["padding_side"] = "left"
    (no_pad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="tunesmith.model.loader"):
        tokenizer = load_tokenizer(no_pad)
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    assert "no pad token" in caplog.text


def test_new_special_tokens_are_single_special_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, new_special_tokens=["<|tool|>", "<|im_end|>", "<|sep|>"])
    assert len(tokenizer) == 2048 + 2  # <|im_end|> already exists
    ids = tokenizer.encode("a<|tool|>b<|sep|>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|tool|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|sep|>") in ids
    assert "<|tool|>" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_missing_tokenizer_or_model_is_a_clear_error(tmp_path):
    with pytest.raises(TunesmithError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TunesmithError, match="cannot load a model"):
        load_model(tmp_path / "nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.dtype == torch.float32
    assert loaded.model.dtype == torch.float32
    assert loaded.attn_implementation == "sdpa"
    assert not loaded.gradient_checkpointing
    assert not loaded.model.model.gradient_checkpointing
    assert not loaded.fp16_loss_scaling
    assert loaded.quantization_bit is None
    assert not loaded.embeddings_resized
    assert loaded.train_embedding_modules == ()


def test_explicit_dtype_attention_and_checkpointing(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="bf16", attn="eager", gradient_checkpointing=True)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.attn_implementation == "eager"
    assert loaded.gradient_checkpointing and loaded.model.model.gradient_checkpointing
    assert loaded.model.config.use_cache is False
    half = load_model(tiny_model_dir, dtype="fp16")
    assert half.model.dtype == torch.float16 and half.fp16_loss_scaling


def test_bad_dtype_and_attention_values():
    with pytest.raises(TunesmithError, match="dtype: unknown value 'fp8'"):
        resolve_dtype("fp8", cuda=False)
    with pytest.raises(TunesmithError, match="flash_attn: unknown value"):
        resolve_attn("flash", cuda=False, dtype=torch.float32)
    with pytest.raises(TunesmithError, match="fa2 needs a CUDA GPU"):
        resolve_attn("fa2", cuda=False, dtype=torch.bfloat16)
    assert resolve_attn("disabled", cuda=False, dtype=torch.float32) == "eager"


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_dtype("auto", cuda=True) == expected
    assert resolve_dtype("auto", cuda=False) == torch.float32


def test_bf16_on_a_gpu_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    with pytest.raises(TunesmithError, match="Tesla T4 has no bf16"):
        resolve_dtype("bf16", cuda=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_on_cpu_is_a_clear_error(tiny_model_dir, bits):
    with pytest.raises(
        TunesmithError, match=r"QLoRA needs a CUDA GPU and bitsandbytes: pip install 'tunesmith\[bnb\]'"
    ):
        load_model(tiny_model_dir, quantization_bit=bits)


def test_quantization_bits_must_be_4_or_8(tiny_model_dir):
    with pytest.raises(TunesmithError, match="allowed: 4, 8"):
        load_model(tiny_model_dir, quantization_bit=3)


def test_new_tokens_grow_embeddings_with_mean_rows(tiny_model_dir):
    base = load_model(tiny_model_dir).model.get_input_embeddings().weight.detach().clone()
    tokenizer = load_tokenizer(tiny_model_dir, new_special_tokens=["<|a|>", "<|b|>"])
    loaded = load_model(tiny_model_dir, tokenizer=tokenizer, resize_vocab=True)
    emb = loaded.model.get_input_embeddings().weight.detach()
    head = loaded.model.get_output_embeddings().weight.detach()
    assert loaded.embeddings_resized
    assert emb.shape[0] == head.shape[0] == 2050  # exactly len(tokenizer), as peft expects
    assert loaded.model.config.vocab_size == 2050
    assert torch.equal(emb[:2048], base)
    new = emb[2048:]
    # Sampled around the old mean with the old covariance: close to the mean, not zero, not a copy.
    assert (new.mean(0) - base.mean(0)).abs().max() < 3 * base.std(0).max()
    assert new.abs().sum() > 0
    assert loaded.train_embedding_modules == ("embed_tokens", "lm_head")


def test_resize_vocab_without_new_rows_still_trains_embeddings(tiny_model_dir):
    loaded = load_model(tiny_model_dir, tokenizer=load_tokenizer(tiny_model_dir), resize_vocab=True)
    assert not loaded.embeddings_resized
    assert loaded.model.get_input_embeddings().weight.shape[0] == 2048
    assert loaded.train_embedding_modules == ("embed_tokens", "lm_head")


def test_zero3_placeholders_count_their_full_size(tiny_model_dir):
    """Under DeepSpeed ZeRO-3 a parameter's local tensor is empty and its size lives in ds_shape/ds_numel:
    the loader must not see 0 embedding rows (a needless resize that trained the embeddings of a LoRA
    run on 2 GPUs), and parameter counts must not be 0."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.loader import embedding_rows
    from tunesmith.model.tuning import count_params

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    before = count_params(model)
    for param in model.parameters():  # what deepspeed.zero.Init leaves on every rank
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        param.data = torch.empty(0, dtype=param.dtype)
    assert embedding_rows(model) == rows
    assert count_params(model) == before
