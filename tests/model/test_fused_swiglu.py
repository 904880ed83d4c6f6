"""fused_swiglu: the Triton kernels give eager's silu(gate) * up and its gradients (in triton's interpreter on
the CPU, natively on a GPU); the MLP wrapper keeps the model's numbers and names, and only where its probe
passes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import interpreted_results, interpreter_tolerance
from tunesmith.model import fused_swiglu
from tunesmith.model.compile import decoder_layers
from tunesmith.model.fused_swiglu import FusedSwiGLUMLP, fuse_swiglu_mlps, kernel_ready, swiglu
from tunesmith.model.tiled_mlp import TiledMLP
from tunesmith.model.tuning import TuningOptions, apply_tuning

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
# (rows, width): one block, several with a partial last one, and an empty tensor
SHAPES = ((4, 256), (37, 131), (0, 64))


def _operands(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, grad = (torch.randn(*shape, generator=g) * s for s in (3.0, 1.0, 1.0))
    return gate.to(dtype), up.to(dtype), grad.to(dtype)


def _eager(gate, up, grad):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = F.silu(gate) * up
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


def _fused(gate, up, grad):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


def run_interpreted(out: str) -> None:
    """In the subprocess (TRITON_INTERPRET=1): the kernels on CPU tensors, every shape and dtype."""
    results = {}
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            gate, up, grad = _operands(shape, dtype)
            assert kernel_ready(gate, up), "TRITON_INTERPRET=1 should let the kernels run on CPU tensors"
            results[f"{shape}-{dtype}"] = _fused(gate, up, grad)
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_results(
        "tests.model.test_fused_swiglu", tmp_path_factory.mktemp("interpreted") / "swiglu.pt"
    )


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_eagers_output_and_gradients(interpreted, shape, dtype):
    want = _eager(*_operands(shape, dtype))
    got = interpreted[f"{shape}-{dtype}"]
    tol = interpreter_tolerance(dtype)
    for name, w, g in zip(("out", "dgate", "dup"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **tol, msg=name)


def test_cpu_without_the_interpreter_runs_the_eager_math():
    gate, up, grad = _operands((5, 40), torch.float32)
    if not os.environ.get("TRITON_INTERPRET"):
        assert not kernel_ready(gate, up)
    for w, g in zip(_eager(gate, up, grad), _fused(gate, up, grad)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _qwen(act: str = "silu", dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, hidden_act=act, attn_implementation="sdpa")  # fmt: skip
    return Qwen2ForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_wrapped_mlps_keep_the_loss_gradients_and_names(method):
    plain = apply_tuning(_qwen(), TuningOptions(finetuning_type=method, lora_rank=4, lora_dropout=0.1)).model
    fused = apply_tuning(_qwen(), TuningOptions(finetuning_type=method, lora_rank=4, lora_dropout=0.1)).model
    names = [n for n, _ in fused.named_parameters()]
    plain.train(), fused.train()
    done, kept = fuse_swiglu_mlps(decoder_layers(fused))
    assert (done, kept) == (2, {})
    assert all(isinstance(layer.mlp, FusedSwiGLUMLP) for layer in decoder_layers(fused))
    assert [n for n, _ in fused.named_parameters()] == names
    assert fused.training and all(m.training for m in fused.modules())  # the probe's eval() undone
    ids = torch.randint(0, 256, (2, 12))
    results = []
    for model in (plain, fused):
        torch.manual_seed(1)  # the same LoRA dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mlps_of_another_activation_or_already_wrapped_are_kept():
    gelu = _qwen("gelu")
    done, kept = fuse_swiglu_mlps(decoder_layers(gelu))
    assert done == 0 and "differs from down(silu(gate) * up)" in kept["Qwen2MLP"]
    tiled = _qwen()
    layers = decoder_layers(tiled)
    for layer in layers:
        layer.mlp = TiledMLP(layer.mlp, 16)
    done, kept = fuse_swiglu_mlps(layers)
    assert done == 0 and "TiledMLP" in kept and all(isinstance(layer.mlp, TiledMLP) for layer in layers)


def test_without_triton_the_kernels_are_never_asked_for(monkeypatch):
    monkeypatch.setattr(fused_swiglu, "_kernels", lambda: None)
    gate, up, _ = _operands((3, 8), torch.float32)
    assert not kernel_ready(gate, up)
    torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
def test_kernels_on_a_gpu_match_eager_and_replay_in_a_cuda_graph():
    for dtype in (torch.bfloat16, torch.float32):
        gate, up, grad = (t.cuda() for t in _operands((3000, 4864), dtype))
        assert kernel_ready(gate, up)
        want, got = _eager(gate, up, grad), _fused(gate, up, grad)
        for name, w, g in zip(("out", "dgate", "dup"), want, got):  # one rounding apart at most
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)
    gate, up, grad = (t.cuda() for t in _operands((1000, 512), torch.bfloat16))
    gate.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        swiglu(gate, up).backward(grad)  # compiled before the capture
        gate.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = swiglu(gate, up)
            out.backward(grad)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        g2, u2, d2 = (t.cuda() for t in _operands((1000, 512), torch.bfloat16, seed))
        gate.data.copy_(g2), up.copy_(u2), grad.copy_(d2)
        graph.replay()
        torch.cuda.synchronize()
        want = _eager(g2, u2, d2)
        torch.testing.assert_close(out, want[0], rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(gate.grad, want[1], rtol=2**-7, atol=2**-7)


def test_mlp_classes_outside_the_allow_list_are_kept_even_when_the_probe_would_pass():
    """SeedOss's MLP is Llama's plus a residual dropout that only training applies: an eval-mode probe cannot
    see it, so only the listed classes are wrapped."""
    from transformers import SeedOssConfig, SeedOssForCausalLM

    model = SeedOssForCausalLM(SeedOssConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             vocab_size=256, pad_token_id=0))  # fmt: skip
    layers = decoder_layers(model)
    assert fused_swiglu.probe(layers[0].mlp) is None  # the numbers alone would pass
    done, kept = fuse_swiglu_mlps(layers)
    assert done == 0 and kept == {"SeedOssMLP": "not an MLP class whose forward the fused one reproduces"}
