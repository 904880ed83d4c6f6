"""The fused LoRA layer (model/lora_fused.py): PEFT's numbers and behaviour, with the update in the matmul."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLinear
from torch import nn

from tunesmith.model import TuningOptions, apply_tuning, load_model, lora_fused
from tunesmith.model.lora_fused import (
    FusedLoraLinear,
    fused_operands,
    plain_linear_targets,
    register_fused_lora,
)


@pytest.fixture
def fuse_on_cpu(monkeypatch):
    """The fused path runs while a CUDA graph is captured; these CPU tests take it as if one were."""
    monkeypatch.setattr(lora_fused, "capturing", lambda x: True)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24)  # a bias
        self.down = nn.Linear(24, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def _pair(**config) -> tuple[nn.Module, nn.Module]:
    """The same random model and adapter (lora_B random, so the adapter counts) as PEFT's and fused."""
    torch.manual_seed(0)
    base = _Two()
    models = []
    for fused in (False, True):
        options = {"r": 4, "lora_alpha": 12, "target_modules": ["up", "down"], **config}
        lora = LoraConfig(**options)
        if fused:
            assert register_fused_lora(lora)
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        models.append(model)
    return models[0], models[1]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


def _grads(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, ...]:
    """Output, input gradient and the LoRA weights' gradients of sum(out^2)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in lora)
    return (out.detach().float(), x.grad, *lora)


def test_fp32_matches_peft_and_takes_the_fused_path(fuse_on_cpu):
    plain, fused = _pair()
    assert all(type(m) is FusedLoraLinear for m in _layers(fused))
    assert all(type(m) is PeftLinear for m in _layers(plain))
    x = torch.randn(2, 5, 16)
    assert all(fused_operands(m, x if m.in_features == 16 else torch.randn(2, 5, 24)) for m in _layers(fused))
    for a, b in zip(_grads(plain, x), _grads(fused, x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_matches_peft_within_rounding(fuse_on_cpu):
    """A bf16 base under autocast with fp32 adapters (a mixed-precision LoRA run): PEFT rounds the product,
    its scaled copy and the sum to bf16, the fused layer once."""
    plain, fused = _pair()
    for model in (plain, fused):
        for layer in _layers(model):
            layer.get_base_layer().to(torch.bfloat16)
    x = torch.randn(4, 7, 16).to(torch.bfloat16)
    assert fused_operands(_layers(fused)[0], x) is None  # outside autocast PEFT keeps the fp32 adapter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_operands(_layers(fused)[0], x) is not None
    for a, b in zip(_grads(plain, x, autocast=True), _grads(fused, x, autocast=True)):
        assert ((b - a).norm() / a.norm()).item() < 2e-2


def test_the_input_needs_no_gradient(fuse_on_cpu):
    plain, fused = _pair()
    x = torch.randn(3, 16)  # 2-D, and no gradient (the first layer under frozen embeddings)
    for model in (plain, fused):
        model.zero_grad()
        model(x).square().sum().backward()
    grads = [[p.grad for n, p in m.named_parameters() if "lora_" in n] for m in (plain, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_model_may_change_the_output_in_place(fuse_on_cpu):
    """OLMo clamps its q/k/v projections' outputs in place (clip_qkv): autograd forbids that on a custom
    Function's view, so the layer returns a view of its own."""
    plain, fused = _pair()
    x = torch.randn(2, 5, 16, requires_grad=True)
    grads = []
    for model in (plain, fused):
        layer = _layers(model)[0]
        assert fused_operands(layer, x) is not None
        out = layer(x)
        out.clamp_(-1.0, 1.0)
        grads.append(torch.autograd.grad(out.square().sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


class _Subclass(nn.Linear):
    """Like a quantized linear: a subclass of nn.Linear that PEFT's own dispatchers would handle."""


def test_only_plain_linear_targets_of_an_unquantized_model_are_fused():
    model = _Two()
    assert plain_linear_targets(model, ["up", "down"])
    model.config = type("Config", (), {"quantization_config": {"load_in_4bit": True}})()
    assert not plain_linear_targets(model, ["up", "down"])  # a pre-quantized checkpoint
    model = _Two()
    model.down = _Subclass(24, 16)
    assert not plain_linear_targets(model, ["up", "down"])
    assert plain_linear_targets(model, ["up"])


def test_outside_a_capture_the_layer_is_peft_s():
    """Eagerly the host's cost decides, and PEFT's C++ autograd nodes cost it less: the same numbers, bit for
    bit, as PEFT's layer."""
    plain, fused = _pair()
    x = torch.randn(2, 5, 16)
    assert not lora_fused.capturing(x)
    for a, b in zip(_grads(plain, x), _grads(fused, x)):
        assert torch.equal(a, b)


def test_torch_compile_traces_the_layer_whole():
    """Under torch.compile the layer is PEFT's, traced without a graph break (fullgraph would raise)."""
    plain, fused = _pair()
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"lora_dropout": 0.1}, "dropout"),
        ({"use_dora": True}, "a variant"),
    ],
)
def test_what_the_fused_path_does_not_cover_runs_peft(fuse_on_cpu, config, why):
    plain, fused = _pair(**config)
    fused.train()
    x = torch.randn(2, 16)
    assert fused_operands(_layers(fused)[0], x) is None, why
    if "lora_dropout" in config:
        plain.eval(), fused.eval()  # dropout is the identity in eval, where the fused path applies
        assert fused_operands(_layers(fused)[0], x) is not None
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_disabled_merged_and_second_adapters_run_peft(fuse_on_cpu):
    plain, fused = _pair()
    x = torch.randn(2, 16)
    with fused.disable_adapter():
        assert fused_operands(_layers(fused)[0], x) is None
        torch.testing.assert_close(fused(x), fused.get_base_model()(x))
    fused.add_adapter("other", LoraConfig(r=2, target_modules=["up", "down"]))
    fused.base_model.set_adapter(["default", "other"])
    assert fused_operands(_layers(fused)[0], x) is None
    fused.set_adapter("default")
    expected = plain(x)
    merged = fused.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_adapter_saved_from_the_fused_layer_loads_into_plain_peft(fuse_on_cpu, tmp_path):
    plain, fused = _pair()
    fused.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(copy.deepcopy(plain.get_base_model()), tmp_path)
    assert all(type(m) is PeftLinear for m in _layers(loaded))
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), fused(x), rtol=1e-5, atol=1e-5)


def test_apply_tuning_fuses_new_adapters(fuse_on_cpu, tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="fp32", gradient_checkpointing=False).model
    peft_model = apply_tuning(model, TuningOptions(lora_rank=4)).model
    layers = _layers(peft_model)
    assert len(layers) == 14 and all(type(m) is FusedLoraLinear for m in layers)
    ids = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():  # a trained adapter: lora_B is no longer zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    grads = []
    for fused in (True, False):
        peft_model.zero_grad()
        with mock.patch.object(lora_fused, "capturing", lambda x, fused=fused: fused):
            peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_bf16_matches_peft_and_replays_in_a_cuda_graph():
    dev = torch.device("cuda")
    plain, fused = _pair()
    for model in (plain, fused):
        model.to(dev)
        for layer in _layers(model):
            layer.get_base_layer().to(torch.bfloat16)
    x = torch.randn(1, 300, 16, device=dev).bfloat16().requires_grad_()

    def step(model: nn.Module) -> list[torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return [out, x.grad, *(p.grad for n, p in model.named_parameters() if "lora_" in n)]

    want = [t.detach().float().clone() for t in step(plain)]
    x.grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(fused)  # warm-up off the capture stream; the gradients stay as the accumulators
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in [x.grad, *(p.grad for p in fused.parameters() if p.grad is not None)]:
        t.zero_()
    spy = mock.patch.object(lora_fused._LoraLinear, "apply", wraps=lora_fused._LoraLinear.apply)
    with spy as calls, torch.cuda.graph(graph):
        got = step(fused)
    assert calls.call_count == 2  # both layers took the fused path in the capture
    for t in [x.grad, *(p.grad for p in fused.parameters() if p.grad is not None)]:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(want, got, strict=True):
        assert ((b.float() - a).norm() / a.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_torch_compile_traces_the_layer_whole():
    """On CUDA tensors the capture query is skipped under torch.compile: no graph break (fullgraph raises)."""
    plain, fused = _pair()
    plain.cuda(), fused.cuda()
    x = torch.randn(2, 5, 16, device="cuda")
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)


def test_a_continued_adapter_gets_the_fused_layers_with_its_own_config(fuse_on_cpu, tmp_path, tiny_model_dir):
    def load():
        return load_model(tiny_model_dir, dtype="fp32", gradient_checkpointing=False).model

    first = apply_tuning(load(), TuningOptions(lora_rank=4, lora_alpha=12, lora_target=("q_proj", "up_proj")))
    with torch.no_grad():
        for name, param in first.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    first.model.save_pretrained(tmp_path / "adapter")
    resumed = apply_tuning(load(), TuningOptions(adapter_name_or_path=(str(tmp_path / "adapter"),))).model
    layers = _layers(resumed)
    assert len(layers) == 4 and all(type(m) is FusedLoraLinear for m in layers)
    assert (
        resumed.peft_config["default"].lora_alpha == 12 and not resumed.peft_config["default"].inference_mode
    )
    plain = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    ids = torch.randint(3, 2000, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            resumed(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)


def test_fuse_eagerly_takes_the_fused_path_outside_a_capture():
    """The bench's eager twin of a captured step: `fuse_eagerly` on a layer runs the fused math eagerly,
    with PEFT's numbers; off (the default), an eager step is PEFT's own forward."""
    plain, fused = _pair()
    x = torch.randn(2, 5, 16)
    spy = mock.patch.object(lora_fused._LoraLinear, "apply", wraps=lora_fused._LoraLinear.apply)
    with spy as calls:
        _grads(fused, x)
        assert calls.call_count == 0
        for m in _layers(fused):
            m.fuse_eagerly = True
        got = _grads(fused, x)
        assert calls.call_count == len(_layers(fused))
    for a, b in zip(_grads(plain, x), got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
