"""Invariant tier: settings that must not change the numbers (packing, batch split, resuming)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.helpers import (
    load_safetensors,
    logged_losses,
    train,
    write_sft_data,
    write_weighted_sft_data,
)
from tunesmith.data.collate import IGNORE_INDEX, CausalLMCollator

# (length, prompt tokens masked from the loss) of each document
DOCS = ((7, 3), (12, 5), (5, 0), (9, 4), (3, 1), (16, 6))


def _token_dataset(tmp_path: Path):
    from tunesmith.data.tokenized import TokenDataset, write_part

    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, 2000, (n,), generator=gen).tolist() for n, _ in DOCS]
    labels = [[IGNORE_INDEX] * masked + doc[masked:] for doc, (_, masked) in zip(ids, DOCS)]
    part = tmp_path / "part-0.arrow"
    write_part(part, {"input_ids": ids, "labels": labels})
    return TokenDataset([part])


def _loss_sum(model, batch: dict[str, Any]) -> tuple[float, int]:
    """(sum of next-token losses, supervised tokens) of a collated batch, as the trainer's forward sees it."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(losses), int((labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked(attn, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.training.setup import PackedDataset

    base = _token_dataset(tmp_path)
    packed = PackedDataset(base, capacity=24)
    assert 1 < len(packed) < len(base)  # several documents share a row
    assert len({len(packed[i]["input_ids"]) for i in range(len(packed))}) > 1  # the batch pads a row
    collate = CausalLMCollator(pad_token_id=0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=attn
    )
    model.train()  # as in training (the tiny model has no dropout)
    with torch.no_grad():
        packed_sum, packed_count = _loss_sum(model, collate([packed[i] for i in range(len(packed))]))
        sums, counts = zip(*(_loss_sum(model, collate([base[i]])) for i in range(len(base))))
        padded_sum, padded_count = _loss_sum(model, collate([base[i] for i in range(len(base))]))
        hf_loss = model(**collate([packed[i] for i in range(len(packed))])).loss
    assert packed_count == sum(counts) == padded_count == sum(n - max(m, 1) for n, m in DOCS)
    separate = sum(sums) / sum(counts)
    assert packed_sum / packed_count == pytest.approx(separate, rel=1e-5)
    assert padded_sum / padded_count == pytest.approx(separate, rel=1e-5)
    assert float(hf_loss) == pytest.approx(separate, rel=1e-5)  # the model's own loss, as the trainer uses it


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_batch_8x1_equals_1x8(weighted, tiny_model_dir, tmp_path):
    """One SGD step: the loss is a mean over the window's supervised tokens, however the window is split."""
    # 8 rows of different lengths and supervised counts; weighted rows go through our own loss
    data = (
        write_weighted_sft_data(tmp_path / "eight.jsonl")
        if weighted
        else write_sft_data(tmp_path / "eight.json", 8)
    )
    common = dict(
        stage="sft",
        finetuning_type="full",
        optim="sgd",
        learning_rate=1.0,
        max_steps=1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    train(
        tiny_model_dir,
        data,
        tmp_path / "a",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        **common,
    )
    train(
        tiny_model_dir,
        data,
        tmp_path / "b",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        **common,
    )

    ((_, loss_a),) = logged_losses(tmp_path / "a")
    ((_, loss_b),) = logged_losses(tmp_path / "b")
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    base = load_safetensors(tiny_model_dir / "model.safetensors")
    a = load_safetensors(tmp_path / "a" / "model.safetensors")
    b = load_safetensors(tmp_path / "b" / "model.safetensors")
    moved = 0
    for name, w in base.items():
        step_a, step_b = a[name] - w, b[name] - w
        torch.testing.assert_close(step_a, step_b, rtol=1e-4, atol=1e-7, msg=name)
        moved += int(step_a.abs().max() > 1e-4)
    assert moved == len(base)


@pytest.mark.parametrize("method", ["full", "lora", "pure_bf16"])
def test_resume_matches_uninterrupted_run(method, tiny_model_dir, sft_data, tmp_path):
    """Stopped at step 3 (mid-epoch, mid-warmup) and resumed: the same losses and weights as one run.

    pure_bf16: StochasticAdamW's noise generators resume from the checkpoint too, or the bf16 weights would
    round differently from step 4 on."""
    common = dict(
        stage="sft",
        finetuning_type="full" if method == "pure_bf16" else method,
        learning_rate=1e-2,
        max_steps=7,
        save_strategy="steps",
        save_steps=3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
    )
    if method == "pure_bf16":
        common.update(pure_bf16=True, bf16=True, use_cpu=True, learning_rate=1e-4)
    full_run, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_model_dir, sft_data, full_run, **common)
    # The state a run stopped after step 3 leaves: its checkpoint, and no later one.
    resumed.mkdir()
    shutil.copytree(full_run / "checkpoint-3", resumed / "checkpoint-3")
    train(
        tiny_model_dir, sft_data, resumed, resume_from_checkpoint="auto", overwrite_output_dir=False, **common
    )

    expected = logged_losses(full_run)
    got = logged_losses(resumed)
    assert [s for s, _ in expected] == list(range(1, 8))
    assert [s for s, _ in got] == list(range(4, 8))
    assert [loss for _, loss in got] == pytest.approx([loss for s, loss in expected if s > 3], rel=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_safetensors(full_run / name), load_safetensors(resumed / name)
    for key in a:
        if method == "pure_bf16":  # the same bf16 weights, bit for bit
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
