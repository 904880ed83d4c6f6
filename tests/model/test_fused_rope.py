"""fused_rope: the Triton kernel rotates queries and keys, and their gradients back, as transformers'
apply_rotary_pos_emb (in triton's interpreter on the CPU, natively on a GPU); the attention wrapper keeps the
model's numbers, names and generation, and is taken only for the classes it reproduces."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.triton_interpreter import interpreted_results, interpreter_tolerance
from tunesmith.model.compile import decoder_layers
from tunesmith.model.fused_rope import FusedRopeAttention, fuse_rope_attention, kernel_ready, probe, rope
from tunesmith.model.tuning import TuningOptions, apply_tuning

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
# (batch, tokens, query heads, key heads, head_dim): Qwen2.5-0.5B's heads; a half of 20 (not a power of two)
SHAPES = ((1, 9, 14, 2, 64), (2, 5, 4, 4, 40))
GPU_TOL = {torch.bfloat16: {"rtol": 2**-7, "atol": 2**-5}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


def _operands(shape, dtype, seed=0):
    b, t, hq, hk, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, hq, d, generator=g), torch.randn(b, t, hk, d, generator=g)
    angles = torch.rand(b, t, d // 2, generator=g) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    dq, dk = torch.randn(b, t, hq, d, generator=g), torch.randn(b, t, hk, d, generator=g)
    return [x.to(dtype) for x in (q, k, angles.cos(), angles.sin(), dq, dk)]


def _reference(q, k, cos, sin, dq, dk):
    """transformers' own rotation, on its head-major layout, and its gradients."""
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.autograd.backward((qe, ke), (dq.transpose(1, 2), dk.transpose(1, 2)))
    return qe.transpose(1, 2).detach(), ke.transpose(1, 2).detach(), q.grad, k.grad


def _ours(q, k, cos, sin, dq, dk):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = rope(q, k, cos, sin)
    torch.autograd.backward((qe, ke), (dq, dk))
    return qe.detach(), ke.detach(), q.grad, k.grad


def run_interpreted(out: str) -> None:
    """In the subprocess (TRITON_INTERPRET=1): the kernel on CPU tensors, every shape and dtype."""
    results = {}
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            ops = _operands(shape, dtype)
            assert kernel_ready(*ops[:4]), "TRITON_INTERPRET=1 should let the kernel run on CPU tensors"
            results[f"{shape}-{dtype}"] = _ours(*ops)
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_results(
        "tests.model.test_fused_rope", tmp_path_factory.mktemp("interpreted") / "rope.pt"
    )


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rotates_and_rotates_gradients_back_as_transformers(interpreted, shape, dtype):
    want = _reference(*_operands(shape, dtype))
    got = interpreted[f"{shape}-{dtype}"]
    tol = interpreter_tolerance(dtype)
    for name, w, g in zip(("q", "k", "dq", "dk"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_is_transformers_math_to_the_bit(dtype):
    ops = _operands(SHAPES[0], dtype)
    if not os.environ.get("TRITON_INTERPRET"):
        assert not kernel_ready(*ops[:4])
    for w, g in zip(_reference(*ops), _ours(*ops)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _model(arch: str, method: str):
    import transformers

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")  # fmt: skip
    if arch == "mistral":
        shape["sliding_window"] = 6
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**shape))
    return apply_tuning(model, TuningOptions(finetuning_type=method, lora_rank=4, lora_dropout=0.1)).model


@pytest.mark.parametrize(
    "arch,method", [("qwen2", "lora"), ("llama", "full"), ("qwen3", "lora"), ("mistral", "lora")]
)
def test_wrapped_attention_keeps_loss_gradients_names_and_generation(arch, method):
    plain, fused = _model(arch, method), _model(arch, method)
    names = [n for n, _ in fused.named_parameters()]
    keys = list(fused.state_dict())
    plain.train(), fused.train()
    assert fuse_rope_attention(decoder_layers(fused)) == (2, {})
    assert all(isinstance(layer.self_attn, FusedRopeAttention) for layer in decoder_layers(fused))
    assert [n for n, _ in fused.named_parameters()] == names and list(fused.state_dict()) == keys
    assert fused.training and all(m.training for m in fused.modules())  # the probe's eval() undone
    ids = torch.randint(0, 256, (2, 12))
    results = []
    for model in (plain, fused):
        torch.manual_seed(1)  # the same LoRA dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-6, atol=1e-7, msg=name)
    plain.eval(), fused.eval()
    prompt = torch.randint(0, 256, (1, 5))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(fused.generate(input_ids=prompt, **kw), plain.generate(input_ids=prompt, **kw))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_the_sliding_window_reaches_the_attention_kernel_as_the_class_passes_it(arch):
    """Under varlen attention the window is only the kernel's argument (the mask carries padding alone):
    Mistral passes its config's, Qwen2 its layer's own."""
    from tunesmith.model import varlen

    name = varlen.register(cuda=False)
    ids = torch.randint(0, 256, (1, 12))
    logits = {}
    for run, window in (("plain", 4), ("fused", 4), ("no window", None)):
        model = _model(arch, "full").eval()
        model.config._attn_implementation = name
        model.config.sliding_window = window
        for layer in decoder_layers(model):
            if hasattr(layer.self_attn, "sliding_window"):  # Qwen2 reads the window into each layer
                layer.self_attn.sliding_window = window
        if run == "fused":
            assert fuse_rope_attention(decoder_layers(model))[0] == 2
        with torch.no_grad():
            logits[run] = model(input_ids=ids).logits
    assert not torch.allclose(logits["no window"], logits["plain"])  # a window of 4 in 12 tokens matters
    torch.testing.assert_close(logits["fused"], logits["plain"], rtol=0, atol=0)


def test_classes_it_does_not_reproduce_are_kept():
    from transformers import Phi3Config, Phi3ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as Real

    phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, pad_token_id=0))  # fmt: skip
    done, kept = fuse_rope_attention(decoder_layers(phi3))  # one fused qkv projection: not in the registry
    assert done == 0 and "not an attention class" in kept["Phi3Attention"]

    class Qwen2Attention(Real):  # the registry's name, another forward (as a future version might have)
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return out * 1.5, weights

    Qwen2Attention.__module__ = Real.__module__
    model = _model("qwen2", "full")
    layers = decoder_layers(model)
    for layer in layers:
        changed = Qwen2Attention(model.config, layer.self_attn.layer_idx)
        changed.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = changed
    assert "differs from the class's forward" in probe(layers[0].self_attn)
    assert fuse_rope_attention(layers)[0] == 0 and all(
        type(layer.self_attn) is Qwen2Attention for layer in layers
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
def test_kernel_on_a_gpu_matches_transformers_and_replays_in_a_cuda_graph():
    for dtype in (torch.bfloat16, torch.float32):
        ops = [x.cuda() for x in _operands((1, 3000, 14, 2, 64), dtype)]
        assert kernel_ready(*ops[:4])
        for name, w, g in zip(("q", "k", "dq", "dk"), _reference(*ops), _ours(*ops)):
            # one ulp at most: the GPU compiler may fuse a product into the sum (H200: 23% of bf16 values
            # one ulp off, 2**-5 at magnitudes 4-8; fp32 4.8e-7)
            torch.testing.assert_close(g, w, **GPU_TOL[dtype], msg=name)
    q, k, cos, sin, dq, dk = (x.cuda() for x in _operands((1, 500, 14, 2, 64), torch.bfloat16))
    q.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.autograd.backward(rope(q, k, cos, sin)[:1], (dq,))  # compiled before the capture
        q.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            qe, ke = rope(q, k, cos, sin)
            torch.autograd.backward((qe,), (dq,))
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        fresh = [x.cuda() for x in _operands((1, 500, 14, 2, 64), torch.bfloat16, seed)]
        for static, new in zip((q.data, k, cos, sin, dq, dk), fresh):
            static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = _reference(*fresh)
        torch.testing.assert_close(qe, want[0], **GPU_TOL[torch.bfloat16])
        torch.testing.assert_close(ke, want[1], **GPU_TOL[torch.bfloat16])
        torch.testing.assert_close(q.grad, want[2], **GPU_TOL[torch.bfloat16])


def test_fused_attention_stays_its_class_through_unload_swaps_pickling_and_attention_outputs(tmp_path):
    """Nothing is copied: PEFT's unload and merge, a child swapped later, transformers' own isinstance checks
    (output_attentions) and pickling see the module as before the swap."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from tunesmith.model.fused_norm import fuse_rms_norms

    plain, fused = _model("qwen2", "lora"), _model("qwen2", "lora")
    for model in (plain, fused):
        for name, p in model.named_parameters():  # adapters that change the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        model.config._attn_implementation = "eager"  # one that returns attention weights
        model.eval()  # no LoRA dropout
    fused.load_state_dict(plain.state_dict())
    assert fuse_rope_attention(decoder_layers(fused))[0] == 2
    attention = decoder_layers(fused)[0].self_attn
    assert isinstance(attention, Qwen2Attention) and isinstance(attention, FusedRopeAttention)
    torch.save(fused, tmp_path / "model.pt")  # a whole-model pickle, loaded fused again
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(decoder_layers(loaded)[0].self_attn, FusedRopeAttention)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        want, got = plain(input_ids=ids, output_attentions=True), fused(input_ids=ids, output_attentions=True)
    assert len(got.attentions) == 2
    for w, g in zip(want.attentions, got.attentions):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    fuse_rms_norms(fused)  # q_norm-less Qwen2 has none in attention; the layer norms swap under a fused model
    base_plain, base_fused = plain.unload(), fused.unload()  # adapters off: the base model's numbers
    with torch.no_grad():
        torch.testing.assert_close(base_fused(input_ids=ids).logits, base_plain(input_ids=ids).logits)
        torch.testing.assert_close(loaded(input_ids=ids).logits, got.logits, rtol=0, atol=0)
    assert not any("lora_" in n for n, _ in base_fused.named_parameters())


def run_interpreted_broadcast(out: str) -> None:
    """In the subprocess (TRITON_INTERPRET=1): one cos/sin row for a batch of 2 (padded batches without
    position ids), and bf16 queries with fp32 cos/sin (full fine-tuning under autocast)."""
    results = {}
    q, k, cos, sin, dq, dk = _operands((2, 6, 4, 2, 32), torch.bfloat16)
    results["broadcast"] = _ours(q, k, cos[:1], sin[:1], dq, dk)
    assert kernel_ready(q, k, cos[:1], sin[:1])
    q32, k32, cos32, sin32, dq32, dk32 = _operands((2, 6, 4, 2, 32), torch.float32)
    assert kernel_ready(q32.bfloat16(), k32.bfloat16(), cos32, sin32)
    results["mixed"] = _ours(q32.bfloat16(), k32.bfloat16(), cos32, sin32, dq32, dk32)
    torch.save(results, out)


@needs_triton
def test_kernel_broadcasts_one_rotation_over_the_batch_and_promotes_as_transformers(tmp_path_factory):
    out = tmp_path_factory.mktemp("interpreted") / "broadcast.pt"
    got = interpreted_results("tests.model.test_fused_rope", out, "run_interpreted_broadcast")
    q, k, cos, sin, dq, dk = _operands((2, 6, 4, 2, 32), torch.bfloat16)
    want = _reference(q, k, cos[:1], sin[:1], dq, dk)
    for name, w, g in zip(("q", "k", "dq", "dk"), want, got["broadcast"]):
        torch.testing.assert_close(g, w, **interpreter_tolerance(torch.bfloat16), msg=name)
    q32, k32, cos32, sin32, dq32, dk32 = _operands((2, 6, 4, 2, 32), torch.float32)
    want = _reference(q32.bfloat16(), k32.bfloat16(), cos32, sin32, dq32, dk32)
    assert [t.dtype for t in want] == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    for name, w, g in zip(("q", "k", "dq", "dk"), want, got["mixed"]):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **interpreter_tolerance(w.dtype), msg=name)
