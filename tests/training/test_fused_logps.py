"""Fused sequence log-probs (DPO/KTO): same sums, counts and gradients as `sequence_logps` on the logits,
no [batch, time, vocab] tensor; DPO and KTO runs log the same losses with the fused path on and off.
"""

# pytest injects test_pref_stages' fixtures, imported below, as the test functions' arguments
# ruff: noqa: F811

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.training.helpers import LogMessages
from tests.training.test_fused_ce import TRANSFORMS, _close, _tiny
from tests.training.test_fused_ce import _LargestTensor as LargestTensor
from tests.training.test_pref_stages import _logs, _train, other_model_dir, pref_dir  # noqa: F401 (its fixtures)
from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.training.fused_ce import LogitTransform, linear_token_logps
from tunesmith.training.fused_head import PROBE_TOKENS, FusedHead, probe_fused_head
from tunesmith.training.pref_losses import sequence_logps
from tunesmith.training.preference import logps

B, T, H, V = 4, 11, 16, 50


def _labels(seed: int) -> torch.Tensor:
    """Prompt holes, right padding, a row with no label at all, a hole inside the answer."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    labels[3, 6] = IGNORE_INDEX
    return labels


class _HiddenModel(torch.nn.Module):
    """A 'causal LM' whose last hidden states are a parameter: logits = transform(lm_head(hidden))."""

    def __init__(self, bias: bool, transform: LogitTransform, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.nn.Parameter(torch.randn(B, T, H, generator=g))
        self.lm_head = torch.nn.Linear(H, V, bias=bias)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V, H, generator=g))
            if bias:
                self.lm_head.bias.copy_(torch.randn(V, generator=g))
        self.transform = transform

    def forward(self) -> SimpleNamespace:
        return SimpleNamespace(logits=self.transform.apply(self.lm_head(self.hidden)))


def _dpo_like(sums: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per sequence (and is nonlinear in them), like DPO's."""
    return -F.logsigmoid(0.7 * (sums[0] - sums[1]) + 0.3 * (sums[3] - sums[2])) + 0.01 * sums.square().sum()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("head_grad", [True, False], ids=["full", "frozen-head"])
def test_sums_counts_and_gradients_equal_sequence_logps(transform, bias, head_grad):
    model = _HiddenModel(bias, TRANSFORMS[transform])
    model.lm_head.requires_grad_(head_grad)  # frozen: LoRA's case, gradients taken in the forward
    labels = _labels(1)
    params = [p for p in model.parameters() if p.requires_grad]
    plain_sums, plain_counts = sequence_logps(model().logits, labels)
    plain_grads = torch.autograd.grad(_dpo_like(plain_sums), params)

    head = FusedHead(model.lm_head, model.transform, chunk_rows=5)  # 5 rows a chunk: 6 chunks, ragged
    sums, counts, outputs = head.sequence_logps(model, {}, labels)
    assert outputs.logits.shape == (B, 0, V)  # the head saw no position
    assert sums.dtype == torch.float32 and counts.dtype == plain_counts.dtype
    assert counts.tolist() == plain_counts.tolist() == [8, 4, 0, 9]
    _close(sums, plain_sums)
    assert sums[2] == 0
    for got, want in zip(torch.autograd.grad(_dpo_like(sums), params), plain_grads):
        _close(got, want)
    with torch.no_grad():  # the no-grad path (references, KTO's KL pass) gives the same values
        _close(head.sequence_logps(model, {}, labels)[0], plain_sums)


def test_token_logps_are_minus_the_cross_entropy_of_each_row():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (9,), generator=g)
    got = linear_token_logps(hidden, weight, targets, chunk_rows=4)
    assert got.shape == (9,)
    _close(got, -F.cross_entropy(hidden @ weight.T, targets, reduction="none"))


@pytest.mark.parametrize("head_grad", [True, False], ids=["full", "frozen-head"])
def test_no_tensor_of_all_rows_by_vocabulary(head_grad):
    rows, vocab, chunk = 64, 500, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, H, generator=g, requires_grad=True)
    weight = torch.randn(vocab, H, generator=g, requires_grad=head_grad)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    with LargestTensor() as mode:
        (linear_token_logps(hidden, weight, targets, chunk_rows=chunk) * upstream).sum().backward()
    assert mode.largest == max(chunk * vocab, vocab * H) < rows * vocab  # a chunk of logits, or dW


def _hf_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows with masked prompts, as PairwiseCollator builds them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    for row, (prompt, length) in enumerate(((3, 11), (4, 8), (2, 9), (5, 11))):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "gemma2", "cohere"])
def test_fused_logps_of_tiny_hf_models_equal_the_logits_path(kind):
    """Every parameter's gradient, tied heads, soft-capped (Gemma 2) and scaled (Cohere) logits included."""
    model = _tiny(kind)
    model.train()
    batch = _hf_batch()
    args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    plain_sums, plain_counts = logps(*args)
    plain_grads = torch.autograd.grad(_dpo_like(plain_sums), params)
    head = probe_fused_head(model, {k: v for k, v in batch.items() if k != "labels"}, chunk_rows=5)
    assert isinstance(head, FusedHead), head
    seen: list[int] = []
    hook = head.head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    try:
        sums, counts = logps(*args, head=head)
    finally:
        hook.remove()
    assert seen == [0]  # the head computed no logits
    assert counts.tolist() == plain_counts.tolist()
    _close(sums, plain_sums)
    for got, want in zip(torch.autograd.grad(_dpo_like(sums), params), plain_grads):
        _close(got, want)


def _run(stage: str, fused: bool, model: Path, data: Path, out: Path, monkeypatch, **overrides: Any) -> Any:
    """A 4-step dpo/kto run, its trainer built with ``fused_loss=fused`` (the switch the SFT path uses).

    Returns (losses, logged loss-path lines, positions each output head computed logits for, per call).
    """
    import tunesmith.training.preference as preference

    base = preference.DPOTrainer if stage == "dpo" else preference.KTOTrainer
    positions: list[int] = []

    class Watched(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs | {"fused_loss": fused})
            heads = [self.model.get_output_embeddings()]
            if self.reference.kind == "model" and self.reference.model is not self.model:
                heads.append(self.reference.model.get_output_embeddings())
            for head in heads:
                head.register_forward_hook(lambda _m, _a, output: positions.append(output.shape[1]))

    with monkeypatch.context() as m:
        m.setattr(preference, "DPOTrainer" if stage == "dpo" else "KTOTrainer", Watched)
        m.setenv("TUNESMITH_CACHE", str(out / "cache"))  # precomputed columns: each run its own
        handler = LogMessages()
        logging.getLogger("tunesmith.train").addHandler(handler)
        try:
            torch.manual_seed(0)  # LoRA's init happens before the run seeds
            _train(model, data, out, stage, max_steps=4, **overrides)
        finally:
            logging.getLogger("tunesmith.train").removeHandler(handler)
    lines = [x for x in handler.messages if x.startswith(("loss: ", "reference log-probs: "))]
    return [r["loss"] for r in _logs(out)], lines, positions


RUNS = [
    pytest.param("dpo", {"finetuning_type": "lora", "pref_ftx": 0.1}, id="dpo-lora-adapter-disabled"),
    pytest.param("dpo", {"finetuning_type": "full", "learning_rate": 1e-3}, id="dpo-full-frozen-copy"),
    pytest.param("dpo", {"finetuning_type": "lora", "ref_model": "OTHER"}, id="dpo-lora-ref_model"),
    pytest.param(
        "dpo",
        {"finetuning_type": "lora", "ref_model": "OTHER", "pref_precompute_ref": True},
        id="dpo-precomputed-ref_model",
    ),
    pytest.param("dpo", {"finetuning_type": "full", "pref_loss": "simpo", "learning_rate": 1e-3}, id="simpo"),
    pytest.param("kto", {"finetuning_type": "lora", "pref_ftx": 0.1}, id="kto-lora-adapter-disabled"),
    pytest.param("kto", {"finetuning_type": "full", "learning_rate": 1e-3}, id="kto-full-frozen-copy"),
]


@pytest.mark.parametrize("stage,overrides", RUNS)
def test_fused_run_logs_the_plain_runs_losses_and_never_builds_logits(
    stage,
    overrides,
    tiny_model_dir,
    other_model_dir,
    pref_dir,
    tmp_path,
    monkeypatch,
):
    overrides = {k: str(other_model_dir) if v == "OTHER" else v for k, v in overrides.items()}
    on, on_lines, on_positions = _run(stage, True, tiny_model_dir, pref_dir, tmp_path / "on", monkeypatch,
                                      **overrides)  # fmt: skip
    off, off_lines, off_positions = _run(stage, False, tiny_model_dir, pref_dir, tmp_path / "off", monkeypatch,
                                         **overrides)  # fmt: skip
    assert len(on) == len(off) == 4 and len(set(on)) > 1  # the policy moved
    assert on == pytest.approx(off, rel=1e-5)

    separate_reference = "ref_model" in overrides or overrides["finetuning_type"] == "full"
    separate_reference = separate_reference and overrides.get("pref_loss") != "simpo"
    off_reason = "turned off (fused_loss=False)"
    assert (
        sorted(x.split(" (")[0] for x in on_lines)
        == ["loss: fused lm_head + cross-entropy"]
        + ["reference log-probs: fused lm_head"] * separate_reference
    ), on_lines  # the policy's and the separate reference's decisions, once each
    assert (
        sorted(off_lines)
        == [f"loss: plain logits path (fused loss off: {off_reason})"]
        + [f"reference log-probs: plain logits path (fused off: {off_reason})"] * separate_reference
    ), off_lines
    assert len(on_lines) == len(off_lines) == 1 + separate_reference
    # the head computed logits only for each probe (one row of <= PROBE_TOKENS), never for a batch
    probes = [p for p in on_positions if p]
    assert len(probes) == len(on_lines) and max(probes) <= PROBE_TOKENS
    assert on_positions.count(0) >= 4
    assert max(off_positions) > PROBE_TOKENS  # the hook sees the plain path's logits
