"""Training and generation run with cuDNN attention switched off, and the flags come back afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tunesmith
from tests.training.helpers import train
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
