"""Training and generation run with cuDNN attention switched off, and the flags come back afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tunesmith
from tests.training.helpers import train
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import load_engine
from tunesmith.infer.settings import SamplingSettings
from tunesmith.model.attention import sdpa_kernels


def _recording_sdpa(monkeypatch) -> list[bool]:
    """Record, at every attention call, whether cuDNN attention was allowed."""
    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_the_context_leaves_cudnn_out_and_restores_the_flags():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    with sdpa_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_training_and_generation_never_call_attention_with_cudnn_allowed(
    monkeypatch, tiny_model_dir, sft_data, tmp_path
):
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the default this guards against
    seen = _recording_sdpa(monkeypatch)
    train(tiny_model_dir, sft_data, tmp_path / "out", max_steps=2)
    trained = len(seen)
    keys = {"model_name_or_path": str(tiny_model_dir), "template": "qwen"}
    engine = load_engine(tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()]))
    prompt = engine.prompt_ids([{"role": "user", "content": "Hello"}])
    engine.generate([prompt], SamplingSettings(max_new_tokens=3))
    list(engine.stream(prompt, SamplingSettings(max_new_tokens=3)))
    assert trained > 0 and len(seen) > trained
    assert not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_flex_attention_sees_packed_documents_apart(tiny_model_dir):
    """flash_attn: flex gets transformers' per-document block mask from packed position ids: the logits of
    a packed row equal those of each document run alone (sdpa's dense block-diagonal mask gives the same)."""
    from tunesmith.model.loader import load_model

    torch.manual_seed(0)
    ids = torch.randint(10, 500, (2, 96))
    pos = torch.cat([torch.arange(40), torch.arange(16), torch.arange(40)]).repeat(2, 1)
    flex = load_model(str(tiny_model_dir), dtype="float32", attn="flex", gradient_checkpointing=False)
    assert flex.attn_implementation == "flex_attention"
    plain = load_model(str(tiny_model_dir), dtype="float32", attn="sdpa", gradient_checkpointing=False).model
    with torch.no_grad():
        packed = flex.model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([plain(input_ids=ids[:, a:b]).logits for a, b in ((0, 40), (40, 56), (56, 96))], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_flex_attention_training_on_cpu_is_refused_with_the_fix(tiny_model_dir, sft_data, tmp_path):
    with pytest.raises(TunesmithError, match="flex trains on a CUDA GPU only.*use flash_attn: sdpa"):
        train(tiny_model_dir, sft_data, tmp_path / "o", flash_attn="flex", packing=True)


def test_flex_on_a_gpu_warns_with_the_measurement(caplog):
    from tunesmith.model.loader import resolve_attn

    with caplog.at_level("WARNING", logger="tunesmith.model.loader"):
        assert resolve_attn("flex", cuda=True, dtype=torch.bfloat16) == "flex_attention"
    assert "5.9x slower than sdpa" in caplog.text and "profile_step_gpu-2026-11-28T0523Z-flex" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tunesmith.model.loader"):
        resolve_attn("sdpa", cuda=True, dtype=torch.bfloat16)
    assert "slower" not in caplog.text
