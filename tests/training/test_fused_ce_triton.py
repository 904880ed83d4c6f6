"""The fused head's Triton chunk kernel: `softmax_grad`'s numbers, in place, chosen per chunk.

On the CPU the kernel runs in triton's interpreter. TRITON_INTERPRET must be set before triton defines the
kernel, and the interpreter patches ``triton.language`` for good once it has run, which would break a real
compile later in the same process (the GPU test). So every interpreted call runs in one subprocess
(`run_interpreted`, about 5 s), which saves its outputs; the tests here compare them with eager
`softmax_grad` and the eager fused head computed in this process. The interpreter casts fp32 to bf16 by
truncation (triton's GPU cast rounds to nearest even), hence bf16's two-ulp tolerance.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from tests.triton_interpreter import interpreted_results
from tunesmith.training import fused_ce, fused_ce_triton
from tunesmith.training.fused_ce import (
    ChunkPlan,
    LogitTransform,
    kernel_or_eager_softmax_grad,
    linear_cross_entropy,
)
from tunesmith.training.fused_ce_chunk import softmax_grad
from tunesmith.training.fused_ce_triton import kernel_fault, triton_ready, triton_softmax_grad

REPO = Path(__file__).resolve().parents[2]
VOCAB, BLOCK = 1000, 256  # four blocks, the last one partly past the vocabulary
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {FP32: 1e-5, BF16: 2**-6, FP16: 2**-9}  # relative, by the gradient's dtype
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@dataclass(frozen=True)
class Case:
    logits: torch.dtype
    compute: torch.dtype
    transform: LogitTransform = LogitTransform()
    weighted: bool = False
    want_grad: bool = True
    want_bias: bool = False
    rows: int = 5
    strided: bool = False  # the logits a column slice of a wider tensor: not contiguous

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(self.rows, VOCAB + 24 * self.strided, generator=g) * 4).to(self.logits)
        logits = logits[:, :VOCAB]
        targets = torch.randint(0, VOCAB, (self.rows,), generator=g)
        weights = torch.rand(self.rows, generator=g) * 2 - 0.5  # DPO's backward weights rows by -grad_out
        return logits, targets, weights if self.weighted else None

    def in_place(self) -> bool:
        return self.want_grad and self.logits == self.compute and not self.strided


BOTH = LogitTransform(scale=3.0, softcap=5.0)
CASES = {
    "bf16": Case(BF16, BF16, want_bias=True),
    "bf16-weighted-scale-softcap": Case(BF16, BF16, BOTH, weighted=True),
    "fp32-weighted-scale-bias": Case(FP32, FP32, LogitTransform(scale=0.25), weighted=True, want_bias=True),
    "bf16-logits-fp32-grad-softcap": Case(BF16, FP32, LogitTransform(softcap=2.0)),
    "fp32-logits-bf16-grad": Case(FP32, BF16, BOTH, weighted=True, want_bias=True),
    "fp16-softcap": Case(FP16, FP16, LogitTransform(softcap=2.0), weighted=True),
    "loss-only": Case(BF16, BF16, BOTH, weighted=True, want_grad=False, want_bias=True),
    "one-row": Case(FP32, FP32, rows=1, want_bias=True),
    "strided": Case(BF16, BF16, weighted=True, strided=True),
}


def _head(bf16: bool) -> tuple[torch.Tensor, ...]:
    """A head with a bias, ragged chunks (37 rows by 8) and a vocabulary of 300 (one block of 512)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(37, 16, generator=g).to(BF16 if bf16 else FP32).requires_grad_()
    weight = (torch.randn(300, 16, generator=g) * 0.5).requires_grad_()  # fp32: a bf16 run's full fine-tuning
    bias = torch.randn(300, generator=g).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=g)
    token_weights = torch.rand(37, generator=g) * 2
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, token_weights=token_weights,
                                transform=BOTH, chunk_rows=8, mixed=BF16 if bf16 else None)  # fmt: skip
    return (loss.detach(), *torch.autograd.grad(loss, [hidden, weight, bias]))


def run_interpreted(out: str) -> None:
    """In the subprocess (TRITON_INTERPRET=1): every case through the kernel, and the fused head through
    its default chunk math, counting the kernel's calls."""
    assert triton_ready(torch.zeros(1)), "TRITON_INTERPRET=1 should let the kernel run on CPU tensors"
    results: dict[str, Any] = {}
    for seed, (name, case) in enumerate(CASES.items()):
        logits, targets, weights = case.inputs(seed)
        loss, grad, bias = triton_softmax_grad(logits, targets, weights, case.transform, case.want_grad,
                                               case.want_bias, case.compute, block=BLOCK)  # fmt: skip
        assert logits.is_contiguous() != case.strided
        in_place = grad is not None and grad.data_ptr() == logits.data_ptr()
        results[name] = {"loss": loss, "grad": grad, "bias": bias, "in_place": in_place}
    for bf16 in (False, True):
        with mock.patch.object(fused_ce, "triton_softmax_grad", wraps=triton_softmax_grad) as spy:
            results[f"head-bf16={bf16}"] = {"out": _head(bf16), "kernel_calls": spy.call_count}
    results["fault"] = {"none": kernel_fault(torch.zeros(300, 16), BOTH, BF16)}
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, Any]:
    return interpreted_results(
        "tests.training.test_fused_ce_triton", tmp_path_factory.mktemp("interpreted") / "results.pt"
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_gives_the_eager_losses_and_gradient(interpreted, name):
    case = CASES[name]
    got = interpreted[name]
    logits, targets, weights = case.inputs(list(CASES).index(name))
    loss, grad, bias = softmax_grad(logits.contiguous(), targets, weights, case.transform, case.want_grad,
                                    case.want_bias, case.compute)  # fmt: skip
    assert got["loss"].dtype == FP32 and got["loss"].shape == (case.rows,)
    _close(got["loss"], loss, rtol=1e-5, atol=1e-5)
    if not case.want_grad:
        assert got["grad"] is None and got["bias"] is None
        return
    assert got["grad"].dtype == case.compute and got["grad"].shape == (case.rows, VOCAB)
    tol = TOL[case.compute]
    _close(got["grad"], grad, rtol=tol)
    assert got["in_place"] == case.in_place()
    if case.want_bias:  # the sums of the gradient as rounded to `compute`: each row off by up to its rounding
        assert got["bias"].dtype == FP32
        _close(got["bias"], bias, rtol=tol, atol=tol * case.rows * float(grad.float().abs().max()))
    else:
        assert got["bias"] is None


@needs_triton
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed"])
def test_fused_head_takes_the_kernel_per_chunk_and_matches_eager(interpreted, bf16):
    """Interpreted, the default chunk math ran the kernel on every chunk (5); here, on the CPU without the
    interpreter, it runs eager `softmax_grad`: the same loss and gradients for hidden, weight and bias."""
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process interprets triton too: the eager reference would be the kernel")
    got = interpreted[f"head-bf16={bf16}"]
    assert got["kernel_calls"] == 5
    assert not triton_ready(torch.zeros(1))
    with mock.patch.object(fused_ce, "triton_softmax_grad", wraps=triton_softmax_grad) as spy:
        eager = _head(bf16)
    assert spy.call_count == 0
    _close(got["out"][0], eager[0], rtol=1e-5)
    tol = 1e-2 if bf16 else 1e-5  # bf16: the gradient rounded before the matmuls, truncated when interpreted
    for actual, expected in zip(got["out"][1:], eager[1:], strict=True):
        assert actual.dtype == expected.dtype
        _close(actual, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_plan_without_a_compile_backend_takes_the_kernel_where_it_runs_or_eager_when_told():
    assert ChunkPlan(8, FP32).math() is kernel_or_eager_softmax_grad
    assert ChunkPlan(8, FP32, kernel=False).math() is softmax_grad


def test_without_triton_the_default_math_is_eager(monkeypatch):
    """CPU users without triton: `triton_ready` is False, the kernel refuses with a fix, eager runs."""
    monkeypatch.setattr(fused_ce_triton, "_kernel", lambda: None)
    logits, targets, _ = Case(FP32, FP32).inputs(0)
    assert not triton_ready(logits)
    with pytest.raises(RuntimeError, match="pip install triton"):
        triton_softmax_grad(logits, targets, None, LogitTransform(), True, False, FP32)
    loss, grad, _ = kernel_or_eager_softmax_grad(
        logits.clone(), targets, None, LogitTransform(), True, False, FP32
    )
    expected = softmax_grad(logits.clone(), targets, None, LogitTransform(), True, False, FP32)
    _close(loss, expected[0], rtol=0, atol=0)
    _close(grad, expected[1], rtol=0, atol=0)


@needs_triton
def test_the_run_check_passes_the_kernel_that_runs(interpreted):
    assert interpreted["fault"]["none"] is None


def test_the_run_check_names_a_kernel_that_fails_or_differs(monkeypatch):
    """`kernel_fault` (the fused head's probe asks it once a run): a kernel that raises (a triton that cannot
    compile it for this GPU) or gets other numbers is named, and the run keeps the eager math."""
    monkeypatch.setattr(fused_ce_triton, "triton_ready", lambda t: True)
    head = torch.zeros(300, 16)

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("PTX .version 9.0 does not support .target sm_70")

    def wrong(logits: torch.Tensor, *rest: Any) -> Any:
        loss, grad, bias = softmax_grad(logits, *rest)
        return loss, grad * 1.1, bias

    monkeypatch.setattr(fused_ce_triton, "triton_softmax_grad", fails)
    assert "failed here (RuntimeError: PTX" in kernel_fault(head, BOTH, BF16)
    monkeypatch.setattr(fused_ce_triton, "triton_softmax_grad", wrong)
    assert "differ from the eager math (loss 0, gradient 0.1)" in kernel_fault(head, BOTH, BF16)

    def off_elsewhere(logits: torch.Tensor, targets: torch.Tensor, *rest: Any) -> Any:
        loss, grad, bias = softmax_grad(logits, targets, *rest)
        hot = torch.zeros_like(grad, dtype=torch.bool)
        hot[torch.arange(len(targets)), targets] = True
        return loss, torch.where(hot, grad, grad * 1.05), bias  # 5% off in every column but the target's

    monkeypatch.setattr(fused_ce_triton, "triton_softmax_grad", off_elsewhere)
    assert "gradient 0.05" in kernel_fault(head, BOTH, BF16)
    monkeypatch.setattr(fused_ce_triton, "triton_softmax_grad", softmax_grad)
    assert kernel_fault(head, BOTH, BF16) is None
    monkeypatch.setattr(fused_ce_triton, "triton_ready", lambda t: False)
    monkeypatch.setattr(fused_ce_triton, "triton_softmax_grad", fails)
    assert kernel_fault(head, BOTH, BF16) is None  # not run where the eager math runs anyway


def test_a_kernel_that_cannot_be_built_leaves_the_eager_math(monkeypatch, caplog):
    """A triton whose jit raises (no source to read, say) is logged; the loss runs eagerly, on any device."""
    pytest.importorskip("triton")
    import triton

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("could not get source code")

    monkeypatch.setattr(triton, "jit", broken)
    assert fused_ce_triton._kernel.__wrapped__() is None
    assert "cannot be built (OSError: could not get source code)" in caplog.text
    monkeypatch.setattr(fused_ce_triton, "_kernel", lambda: None)
    assert kernel_fault(torch.zeros(300, 16), BOTH, BF16) is None
    logits, targets, _ = Case(FP32, FP32).inputs(0)
    loss, _, _ = kernel_or_eager_softmax_grad(logits, targets, None, LogitTransform(), True, False, FP32)
    assert torch.isfinite(loss).all()


def test_the_probe_keeps_the_eager_math_when_the_kernel_fails_its_check(monkeypatch, caplog):
    from tunesmith.training import fused_head

    monkeypatch.setattr(fused_head, "kernel_fault", lambda *args: "the kernel failed here (RuntimeError: x)")
    model = _tiny_lm()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    head = fused_head.probe_fused_head(model, {"input_ids": ids, "labels": ids})
    assert not isinstance(head, str) and head.kernel is False
    assert "softmax eager (its Triton kernel failed its check)" in head.describe()
    assert "the kernel failed here (RuntimeError: x); its softmax runs eagerly" in caplog.text
    monkeypatch.setattr(fused_head, "kernel_fault", lambda *args: None)
    head = fused_head.probe_fused_head(model, {"input_ids": ids, "labels": ids})
    assert head.kernel is True and "softmax eager" not in head.describe()


def _tiny_lm() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def test_block_columns_is_the_next_power_of_two_up_to_the_cap():
    assert [fused_ce_triton.block_columns(v) for v in (1, 50, 300, 4096, 151_936)] == [2, 64, 512, 4096, 4096]


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_on_a_gpu_matches_eager_and_replays_in_a_cuda_graph():
    """Qwen-like softcapped bf16 chunk at an odd offset into the batch's targets and weights; every chunk size
    and offset shares one compiled kernel; captured in a CUDA graph and replayed on new logits."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, vocab, transform = 64, 50_000, LogitTransform(scale=0.5, softcap=30.0)
    batch_targets = torch.randint(0, vocab, (rows + 1,), device=dev, generator=g)
    batch_weights = torch.rand(rows + 1, device=dev, generator=g) * 2 - 0.5
    targets, weights = batch_targets[1:], batch_weights[1:]

    def logits_of(seed: int) -> torch.Tensor:
        return (torch.randn(rows, vocab, device=dev, generator=g.manual_seed(seed)) * 4).bfloat16()

    def check(got: tuple, logits: torch.Tensor, compute: torch.dtype, want_grad: bool = True) -> None:
        want = softmax_grad(logits.clone(), targets, weights, transform, want_grad, want_grad, compute)
        _close(got[0], want[0], rtol=1e-5, atol=1e-4)
        if want_grad:
            _close(got[1], want[1], rtol=TOL[compute])
            _close(got[2], want[2], rtol=TOL[compute], atol=TOL[compute] * rows * float(want[1].abs().max()))

    logits = logits_of(1)
    for compute, want_grad in ((BF16, True), (FP32, True), (BF16, False)):
        check(triton_softmax_grad(logits.clone(), targets, weights, transform, want_grad, want_grad, compute),
              logits, compute, want_grad)  # fmt: skip
    fn = fused_ce_triton._kernel().fn
    caches = getattr(fn, "device_caches", None)  # triton >= 3.3: {device: (compiled kernels, ...)}
    compiled = len(caches[torch.cuda.current_device()][0]) if caches is not None else None
    for start in (0, 1, 2, 3):  # other chunk sizes at other alignments of the batch's targets and weights
        chunk = logits[start : start + 7].clone()
        triton_softmax_grad(chunk, batch_targets[start : start + 7], batch_weights[start : start + 7],
                            transform, True, True, BF16)  # fmt: skip
    if caches is not None:
        assert len(caches[torch.cuda.current_device()][0]) == compiled, (
            "a chunk size or offset compiled a new kernel"
        )

    static = logits.clone()

    def step() -> tuple:
        return triton_softmax_grad(static.clone(), targets, weights, transform, True, True, BF16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up off the capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (2, 3):
        fresh = logits_of(seed)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        check(out, fresh, BF16)
