"""fused_rms_norm: transformers' RMSNorm layers swapped for torch's rms_norm times the same weight, only where a
probe shows the class computes exactly that; the same numbers, names and parameters; variants kept."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tunesmith.model.fused_layers import fuse_layers
from tunesmith.model.fused_norm import FusedRMSNorm, fuse_rms_norms, probe
from tunesmith.model.tuning import TuningOptions, apply_tuning


def _qwen(dtype: torch.dtype = torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")  # fmt: skip
    model = Qwen2ForCausalLM(cfg).to(dtype)
    for name, p in model.named_parameters():  # norm weights other than their initial ones
        if "norm" in name:
            with torch.no_grad():
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_model_gives_the_same_loss_and_gradients(dtype):
    plain, fused = _qwen(dtype), _qwen(dtype)
    weights = {n: p for n, p in fused.named_parameters()}
    swap = fuse_rms_norms(fused)
    assert swap.swapped == {"Qwen2RMSNorm": 2 * 2 + 1} and not swap.kept
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 5
    # the same parameters, under the same names: optimizers, adapters and state dicts see no change
    assert {n: p for n, p in fused.named_parameters()} == weights
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 256, (2, 12))
    (want, want_g), (got, got_g) = _loss_and_grads(plain, ids), _loss_and_grads(fused, ids)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        if dtype == torch.float32:
            torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-4, atol=1e-5, msg=name)
        else:  # bf16: one rounding apart per norm, compared norm-wise
            rel = (got_g[name].float() - want_g[name].float()).norm() / want_g[name].float().norm().clamp(
                min=1e-6
            )
            assert rel < 5e-2, (name, float(rel))


def test_lora_model_swaps_and_trains_its_adapters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = apply_tuning(model, TuningOptions(finetuning_type="lora", lora_rank=4)).model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen_norms = {n: p.requires_grad for n, p in model.named_parameters() if "norm" in n}
    swap = fuse_rms_norms(model)
    assert sum(swap.swapped.values()) == 2 * model.config.num_hidden_layers + 1
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    assert {n: p.requires_grad for n, p in model.named_parameters() if "norm" in n} == frozen_norms
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_variants_that_compute_something_else_are_kept(caplog):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # x * (1 + weight)

    class EpsOutsideRMSNorm(nn.Module):  # x / (rms + eps): equal but for rows near zero
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-3

        def forward(self, x):
            return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)

    class BiasRMSNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), 1e-6

        def forward(self, x):
            return self.weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=self.eps) + self.bias

    for cls in (EpsOutsideRMSNorm, BiasRMSNorm):
        cls.__module__ = "transformers_modules.remote"  # as a checkpoint's remote code would be
    model = nn.Sequential(GemmaRMSNorm(32), EpsOutsideRMSNorm(32), BiasRMSNorm(32))
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        done = fuse_layers(model)
    assert not done.norms and set(done.kept) == {"GemmaRMSNorm", "EpsOutsideRMSNorm", "BiasRMSNorm"}
    swap = fuse_rms_norms(model)
    assert not swap.swapped and swap.kept == done.kept
    assert "differs from weight * rms_norm(x)" in swap.kept["GemmaRMSNorm"]
    assert "differs from weight * rms_norm(x)" in swap.kept["EpsOutsideRMSNorm"]
    assert "parameters ['weight', 'bias']" in swap.kept["BiasRMSNorm"]
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert "fused layers: 0 RMSNorm layers as torch's rms_norm; 0 MLPs" in caplog.text
    assert "GemmaRMSNorm kept (differs" in caplog.text


def test_other_libraries_norms_and_unmaterialised_weights_are_left_alone():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    class LigerRMSNorm(Qwen2RMSNorm):  # another library's kernel layer: the user chose it
        pass

    LigerRMSNorm.__module__ = "liger_kernel.transformers.rms_norm"
    model = nn.Sequential(LigerRMSNorm(16))
    assert fuse_rms_norms(model).swapped == {} and isinstance(model[0], LigerRMSNorm)
    with torch.device("meta"):
        meta = Qwen2RMSNorm(16)
    assert "not materialised" in probe(meta)
    sharded = Qwen2RMSNorm(16)
    sharded.weight = nn.Parameter(torch.empty(0))  # as ZeRO-3 leaves a partitioned weight
    assert probe(sharded) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swap_on_a_gpu_in_bf16_passes_the_probe_and_keeps_the_loss():
    plain, fused = _qwen(torch.bfloat16).cuda(), _qwen(torch.bfloat16).cuda()
    assert fuse_rms_norms(fused).swapped == {"Qwen2RMSNorm": 5}  # torch's CUDA kernel rounds as HF does
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    want, _ = _loss_and_grads(plain, ids)
    got, _ = _loss_and_grads(fused, ids)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
