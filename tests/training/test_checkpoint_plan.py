"""Gradient checkpointing `auto`: the activation probe, the plan, and the switch on a LoRA model (CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from tunesmith.training import checkpoint_plan as cp
from tunesmith.training.causal_lm import _checkpointing
from tunesmith.training.run_steps import auto_checkpointing

GIB = 2**30


def test_plan_turns_checkpointing_off_only_when_the_run_fits_in_half_the_card():
    fits = cp.plan(bytes_per_token=2**20, tokens=16_384, fixed_bytes=2 * GIB, device_bytes=80 * GIB)
    # 2 GiB + 16 GiB x 1.15 + 1 GiB = 21.4 GiB <= 40 GiB
    assert not fits.on and fits.estimate_bytes == pytest.approx(21.4 * GIB)
    assert "21.4 GiB without it at 16,384 tokens per micro-batch (1.00 MiB a token)" in fits.reason
    tight = cp.plan(bytes_per_token=2**20, tokens=16_384, fixed_bytes=2 * GIB, device_bytes=40 * GIB)
    assert tight.on and "more than 50% of it" in tight.reason
    unknown = cp.plan(bytes_per_token=None, tokens=16, fixed_bytes=0, device_bytes=80 * GIB)
    assert unknown.on and "faster than linearly" in unknown.reason


def test_saved_bytes_counts_each_storage_once():
    x = torch.ones(1000, requires_grad=True)
    assert cp.saved_bytes(lambda: (x * x).sum()) == 4000  # mul saves x twice: one storage
    assert cp.saved_bytes(lambda: (x.exp() * x).sum()) == 8000  # exp's output, and x
    with torch.no_grad():
        assert cp.saved_bytes(lambda: (x * x).sum()) == 0


@pytest.fixture
def lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.tuning import TuningOptions, apply_tuning

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    return apply_tuning(model, TuningOptions(finetuning_type="lora", lora_rank=4)).model


def test_the_probe_predicts_the_activations_of_a_training_batch(lora_model):
    vocab = lora_model.get_input_embeddings().num_embeddings
    per_token = cp.activation_bytes_per_token(
        lora_model, vocab_size=vocab, device=torch.device("cpu"), autocast_dtype=None, uncast=_nothing
    )
    weights = sum(p.numel() * p.element_size() for p in lora_model.parameters())
    lora_model.train()
    for rows, width in ((4, 256), (8, 512)):  # batches of several rows, longer than the probe's
        batch = torch.randint(0, vocab, (rows, width))
        real = cp.saved_bytes(
            lambda b=batch: lora_model(input_ids=b, use_cache=False, logits_to_keep=1).logits.sum()
        )
        # what does not grow with the tokens (weights saved for backward, at most all of them) comes on top
        assert per_token * batch.numel() <= real <= per_token * batch.numel() + weights, (rows, width)
    assert weights < 0.05 * per_token * 8 * 512  # so the bound above is tight


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_eager_attention_grows_faster_than_linearly_so_no_slope_is_given(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    vocab = model.get_input_embeddings().num_embeddings
    assert (
        cp.activation_bytes_per_token(
            model, vocab_size=vocab, device=torch.device("cpu"), autocast_dtype=None, uncast=_nothing
        )
        is None
    )


@pytest.mark.parametrize("card_gib,on", [(1e-3, True), (1000, False)])
def test_auto_turns_checkpointing_on_only_when_the_run_would_not_fit(
    card_gib, on, lora_model, caplog, monkeypatch
):
    # tunesmith's logger may not propagate (configure_logging), so listen on it directly
    logger = logging.getLogger("tunesmith")
    logger.addHandler(caplog.handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        found = auto_checkpointing(
            lora_model,
            tokens=8 * 2048,
            device="cpu",
            precision={"bf16": True, "fp16": False},  # the probe runs under (CPU) autocast, LoRA uncast
            device_bytes=int(card_gib * GIB),
        )
    finally:
        logger.removeHandler(caplog.handler)
    assert found.on is on and found.bytes_per_token > 0
    assert lora_model.base_model.model.is_gradient_checkpointing is on
    wanted = "gradient checkpointing on (auto)" if on else "gradient checkpointing off (auto)"
    assert wanted in caplog.text and "disable_gradient_checkpointing: " in caplog.text


def test_auto_measures_only_single_device_pt_and_sft_runs_on_a_gpu_without_an_explicit_choice():
    base = dict(disable=None, kind="sft", quantized=False, sharded=False, cuda=True)
    assert cp.decides(**base) and cp.decides(**base | {"kind": "pt"})
    for change in ({"disable": True}, {"disable": False}, {"kind": "dpo"}, {"quantized": True},
                   {"sharded": True}, {"cuda": False}):  # fmt: skip
        assert not cp.decides(**base | change), change
    # load_model's argument: unset -> None (on with a GPU), set -> LLaMA-Factory's meaning, deferred -> off
    assert [_checkpointing(None, False), _checkpointing(False, False), _checkpointing(True, False)] == [
        None,
        True,
        False,
    ]
    assert _checkpointing(None, True) is False


@pytest.mark.parametrize("card_gib,state", [(1000, "off"), (1e-3, "on")])
def test_sft_training_decides_on_its_device_and_trains(
    card_gib, state, monkeypatch, tiny_model_dir, sft_data, tmp_path, capsys
):
    """The wiring through start_run, with the GPU-only gates opened on CPU: the card's size decides."""
    from types import SimpleNamespace

    from tests.training.helpers import logged_losses, train

    monkeypatch.setattr(cp, "decides", lambda **kw: kw["disable"] is None and kw["kind"] == "sft")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=int(card_gib * GIB))
    )
    train(tiny_model_dir, sft_data, tmp_path / "out", max_steps=2, per_device_train_batch_size=4)
    err = capsys.readouterr().err  # tunesmith's own stderr handler (configure_logging), not propagated
    assert f"gradient checkpointing {state} (auto): about" in err
    assert "gradient checkpointing auto (decided on the GPU)" in err
    assert len(logged_losses(tmp_path / "out")) == 2


def test_a_failing_probe_leaves_checkpointing_on(monkeypatch, lora_model):
    def broken(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(cp, "activation_bytes_per_token", broken)
    found = auto_checkpointing(
        lora_model, tokens=64, device="cpu", precision={"bf16": False, "fp16": False}, device_bytes=GIB
    )
    assert found.on and "probe failed (RuntimeError: CUDA error: out of memory)" in found.reason
    assert lora_model.base_model.model.is_gradient_checkpointing


def test_a_varlen_model_is_probed_through_its_boundaries(tiny_model_dir, monkeypatch):
    """Without boundaries varlen takes its masked-SDPA path, which can fall to the quadratic math kernel on a
    GPU (GQA with a mask): the probe must measure the path training takes."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model import varlen

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=varlen.register())
    vocab = model.get_input_embeddings().num_embeddings
    documents, original = [], varlen.reference_varlen
    monkeypatch.setattr(
        varlen, "reference_varlen", lambda *a: documents.append(a[3].tolist()) or original(*a)
    )
    per_token = cp.activation_bytes_per_token(
        model, vocab_size=vocab, device=torch.device("cpu"), autocast_dtype=None, uncast=_nothing
    )
    assert per_token and per_token > 0
    assert [0, 512] in documents  # the one document of the 512-token probe, through the varlen path
