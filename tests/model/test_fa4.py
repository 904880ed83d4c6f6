"""varlen_kernel and FlashAttention-4 (tunesmith.model.fa4): the choice, its errors, the custom ops' shapes on
CPU; on a Hopper/Blackwell GPU with flash-attn-4, the kernels against PyTorch's, eager and compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.model import fa4, varlen

FA4_MISSING = fa4.unusable()
on_fa4_gpu = pytest.mark.skipif(FA4_MISSING is not None, reason=f"FA4 cannot run here: {FA4_MISSING}")


def api() -> varlen.KernelApi:
    from torch.nn.attention.varlen import varlen_attn

    return varlen.KernelApi.of(varlen_attn)


def test_without_the_package_fa4_says_how_to_install_it() -> None:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        assert fa4.unusable() == "the flash-attn-4 package is not installed (pip install 'tunesmith[fa4]')"
    else:
        pytest.skip("flash-attn-4 is installed here")


def test_kernel_choice_without_cuda() -> None:
    assert fa4.choose("torch", api(), cuda=False, dtype=torch.bfloat16, head_size=64) == "torch"
    assert fa4.choose("auto", api(), cuda=False, dtype=torch.bfloat16, head_size=64) == "torch"
    with pytest.raises(TunesmithError) as e:
        fa4.choose("fa4", api(), cuda=False, dtype=torch.bfloat16, head_size=64)
    assert "varlen_kernel: fa4 cannot run: there is no CUDA GPU" in str(e.value)
    assert "varlen_kernel: torch" in str(e.value)
    with pytest.raises(TunesmithError, match="varlen_kernel: unknown value 'fa3'; allowed: auto, torch, fa4"):
        fa4.choose("fa3", api(), cuda=False, dtype=torch.bfloat16, head_size=64)


def test_register_fa4_on_cpu_fails_with_the_fix() -> None:
    with pytest.raises(TunesmithError, match="varlen_kernel: fa4 cannot run"):
        varlen.register(cuda=False, kernel="fa4")
    assert varlen.register(cuda=False, kernel="auto") == varlen.ATTN_NAME


def test_config_refuses_varlen_kernel_without_varlen(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nflash_attn: sdpa\nvarlen_kernel: fa4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    problems = {p.key: p.render() for p in e.value.problems}
    assert (
        "flash_attn is sdpa" in problems["varlen_kernel"]
        and "set flash_attn: varlen" in problems["varlen_kernel"]
    )
    path.write_text("model_name_or_path: m\nflash_attn: varlen\nvarlen_kernel: fa4\n")
    assert load_config(path, environ={}).model.varlen_kernel == "fa4"
    path.write_text("model_name_or_path: m\nvarlen_kernel: fa5\n")
    with pytest.raises(ConfigError, match="varlen_kernel"):
        load_config(path, environ={})


def test_custom_ops_shapes_and_gradients_under_fake_tensors() -> None:
    """The ops' fake implementations (what torch.compile traces) give the real ops' shapes, through backward."""
    with FakeTensorMode():
        q = torch.empty(40, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(40, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(40, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 15, 40], dtype=torch.int32)
        out, lse = torch.ops.tunesmith.fa4_varlen_fwd(q, k, v, cu, 25, 0.125, -1)
        assert out.shape == q.shape and lse.shape == (8, 40) and lse.dtype == torch.float32
        fa4.fa4_varlen(q, k, v, cu, 25, 0.125, None).float().sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def _docs(heads: int, kv: int, d: int, lengths: list[int], seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(lengths)
    q, k, v = (
        torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (heads, kv, kv)
    )
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    return q, k, v, cu, max(lengths)


def _fwd_bwd(fn, q, k, v, cu, max_len, window=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, cu, max_len, q.shape[-1] ** -0.5, window)
    out.float().square().sum().backward()
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@on_fa4_gpu
@pytest.mark.parametrize("window", [None, 64])
def test_fa4_matches_torch_flash_on_packed_documents(window: int | None) -> None:
    q, k, v, cu, max_len = _docs(8, 2, 64, [1, 37, 300, 129, 513])
    got = _fwd_bwd(fa4.fa4_varlen, q, k, v, cu, max_len, window)
    ref = _fwd_bwd(lambda *a: varlen.flash_varlen(*a, api()), q, k, v, cu, max_len, window)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert _rel(a, b) < 2e-2, name


@on_fa4_gpu
def test_fa4_compiles_in_one_graph_with_the_same_numbers() -> None:
    q, k, v, cu, max_len = _docs(8, 2, 64, [200, 56, 400])
    proj = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)

    def layer(q, k, v, cu, max_len, scale, window):
        return proj(fa4.fa4_varlen(proj(q), k, v, cu, max_len, scale, window))

    eager = _fwd_bwd(layer, q, k, v, cu, max_len)
    torch._dynamo.reset()
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True, dynamic=True), q, k, v, cu, max_len)
    for name, a, b in zip(("out", "dq", "dk", "dv"), compiled, eager):
        assert _rel(a, b) < 1e-2, name


@on_fa4_gpu
def test_auto_picks_fa4_where_it_runs() -> None:
    assert fa4.choose("auto", api(), cuda=True, dtype=torch.bfloat16, head_size=64) == "fa4"
    assert "float32" in fa4.preflight(api(), torch.float32, 64)
