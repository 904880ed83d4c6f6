"""The fused head's per-chunk math: the compiler-friendly form equals the eager one, and compiled it trains alike.

`torch_compile: true` runs each chunk's softmax and gradient through `compiled_softmax_grad`; these tests pin
its numbers to the eager in-place form (every logit transform, weights, bias sums, both matmul dtypes) and
run it through inductor on the CPU: one graph for every chunk size, the same loss and gradients as eager.
"""

from __future__ import annotations

import pytest
import torch

from tunesmith.training import fused_ce_chunk
from tunesmith.training.fused_ce import LogitTransform, linear_cross_entropy, linear_token_logps
from tunesmith.training.fused_ce_chunk import fusable_softmax_grad, softmax_grad

TRANSFORMS = {
    "plain": LogitTransform(),
    "softcap": LogitTransform(softcap=2.0),
    "scale": LogitTransform(scale=0.25),
    "both": LogitTransform(scale=3.0, softcap=5.0),
}


def _chunk(
    rows: int = 19, vocab: int = 300, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    return logits, torch.randint(0, vocab, (rows,), generator=g), torch.rand(rows, generator=g) * 2


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fusable_form_equals_the_eager_form(transform, weighted, compute):
    logits, targets, weights = _chunk()
    logits = logits.to(compute)
    rest = (targets, weights if weighted else None, TRANSFORMS[transform])
    # the eager form works in place on its input (a chunk's fresh logits): each call gets its own copy
    eager_loss, eager_g, eager_sum = softmax_grad(logits.clone(), *rest, True, True, compute)
    loss, g, g_sum = fusable_softmax_grad(logits, *rest, True, True, compute)
    assert g.dtype == eager_g.dtype == compute and g_sum.dtype == torch.float32
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.float(), eager_g.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sum, eager_sum, rtol=1e-5, atol=1e-5)
    # the gradient of the summed (weighted) loss: a softmax row minus the one-hot target, times the weight
    z = TRANSFORMS[transform].apply(logits.float()).requires_grad_()
    losses = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    (grad_z,) = torch.autograd.grad((losses * weights).sum() if weighted else losses.sum(), [z])
    if transform == "plain":
        torch.testing.assert_close(
            g.float(), grad_z, rtol=1e-2 if compute == torch.bfloat16 else 1e-5, atol=1e-6
        )
    without = fusable_softmax_grad(logits, *rest, False, False, compute)
    assert without[1] is None and without[2] is None
    torch.testing.assert_close(without[0], eager_loss, rtol=1e-6, atol=1e-6)


def test_compiled_head_gives_the_eager_loss_and_gradients_with_one_graph():
    """Inductor (C++ on the CPU) over ragged chunk sizes and three batch sizes: one graph per call kind."""
    fused_ce_chunk._compiled.cache_clear()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    transform = LogitTransform(scale=0.5, softcap=4.0)
    for rows in (37, 51, 33):  # chunks of 8 rows, the last of 5, 3, then 1 row (eager: dynamo specialises 1)
        hidden = torch.randn(rows, 16, generator=g, requires_grad=True)
        targets = torch.randint(0, 300, (rows,), generator=g)
        token_weights = torch.rand(rows, generator=g)
        losses = {}
        grads = {}
        for backend in (None, "inductor"):
            loss = linear_cross_entropy(hidden, weight, targets, token_weights=token_weights, transform=transform,
                                        chunk_rows=8, compile_backend=backend)  # fmt: skip
            losses[backend] = loss.detach()
            grads[backend] = torch.autograd.grad(0.37 * loss, [hidden, weight])
        torch.testing.assert_close(losses["inductor"], losses[None], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads["inductor"], grads[None], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # per-row log-probs (DPO/KTO) take the same compiled math: its no-gradient form is a second graph
    with torch.no_grad():
        logps = linear_token_logps(hidden, weight, targets, transform=transform, chunk_rows=8,
                                   compile_backend="inductor")  # fmt: skip
        eager = linear_token_logps(hidden, weight, targets, transform=transform, chunk_rows=8)
    torch.testing.assert_close(logps, eager, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compiled_head_of_a_full_bf16_run_matches_eager():
    """An fp32 head of a bf16 run (full fine-tuning): matmuls and the chunk's gradient in bf16, compiled alike."""
    fused_ce_chunk._compiled.cache_clear()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(45, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 16, generator=g, requires_grad=True)  # fp32, trained
    targets = torch.randint(0, 300, (45,), generator=g)
    out = {}
    for backend in (None, "inductor"):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, mixed=torch.bfloat16,
                                    compile_backend=backend)  # fmt: skip
        out[backend] = (loss.detach(), *torch.autograd.grad(loss, [hidden, weight]))
    eager, compiled = out[None], out["inductor"]
    assert compiled[1].dtype == torch.bfloat16 and compiled[2].dtype == torch.float32
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled[1:], eager[1:], strict=True):  # the same bf16 roundings, up to one ulp
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)
