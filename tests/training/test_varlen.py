"""flash_attn: varlen: document boundaries from the collator, the attention function's two paths, the
flash kernel adapter (with a stand-in kernel: CPU has no flash), and training equal to sdpa's."""

from __future__ import annotations

import pytest
import torch

import tunesmith
from tests.training.helpers import logged_losses, train, write_pt_data, write_weighted_sft_data
from tunesmith.data.collate import BOUNDARY_KEYS, CausalLMCollator, document_boundaries
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.infer.engine import load_engine
from tunesmith.infer.settings import SamplingSettings
from tunesmith.model import varlen
from tunesmith.model.loader import load_model


def test_boundaries_split_packed_documents_and_trailing_padding():
    pos = [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    # row 0: documents at 0, 3, 5, padding at 6; row 1: one document, padding at 14
    assert document_boundaries(pos, [6, 6], 8) == [0, 3, 5, 6, 8, 14, 16]
    assert document_boundaries(None, [3, 8, 1], 8) == [0, 3, 8, 16, 17, 24]


def test_collator_sends_boundaries_only_when_asked():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]}]  # fmt: skip
    plain = CausalLMCollator(0, pad_to_multiple_of=8)(rows)
    assert not set(BOUNDARY_KEYS) & set(plain)
    batch = CausalLMCollator(0, pad_to_multiple_of=8, boundaries=True)(rows)
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 8]  # packed rows back to back: no padding
    # every row's first label is masked: the token before it belongs to the row before (padded, it has none)
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, 6, 7]]
    assert batch["loss_rows"].tolist() == plain["loss_rows"].tolist()[:4] + [5, 6]  # same targets, 8 wide
    assert batch["max_length_q"] == batch["max_length_k"] == 8
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]


def test_packed_rows_become_one_row_whatever_the_batch_size():
    """Compiled layers see [1, total] for any number of packed rows: a last batch of one row does not
    specialise (and recompile) them on size 1. Labels come as packed (first labels already masked)."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1],
             "weights": [0.0, 1.0, 0.5, 0.0, 1.0]},
            {"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "position_ids": [0, 1, 2]}]  # fmt: skip
    collate = CausalLMCollator(0, pad_to_multiple_of=4, boundaries=True)
    two, one = collate(rows), collate(rows[1:])
    assert two["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 5]]
    assert two["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4, 5]]
    assert two["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert two["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and two["max_length_q"] == 8
    assert two["loss_weights"].tolist() == [[0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0, 1.0]]
    assert two["loss_rows"].tolist() == [0, 1, 3, 5, 6]  # position i's target is label i + 1
    assert one["input_ids"].shape == (1, 4) and one["cu_seq_lens_q"].tolist() == [0, 3, 4]
    assert one["labels"].tolist() == [[-100, 4, 5, -100]] and "loss_weights" not in one
    # the trailing padding is the longest segment: the longest-document bound covers it
    wide = CausalLMCollator(0, pad_to_multiple_of=512, boundaries=True)(rows[1:])
    assert wide["cu_seq_lens_q"].tolist() == [0, 3, 512] and wide["max_length_q"] == 512
    # a row whose last document continues its positions into the next row still splits at the row
    glued = collate([{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]},
                     {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [2, 3]}])  # fmt: skip
    assert glued["cu_seq_lens_q"].tolist() == [0, 2, 4]


def test_unpacked_rows_are_put_back_to_back_without_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "weights": [1.0, 1.0, 0.5]},
            {"input_ids": [8, 9, 10, 11, 12], "labels": [8, -100, 10, 11, 12]}]  # fmt: skip
    batch = CausalLMCollator(0, pad_to_multiple_of=4, boundaries=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]  # 8 tokens: no padding needed
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 10, 11, 12]]  # each first label masked
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8] and batch["max_length_q"] == 8
    assert batch["loss_weights"].tolist() == [[0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0]]
    assert "attention_mask" not in batch
    odd = CausalLMCollator(0, pad_to_multiple_of=8, boundaries=True)(rows[:1] + rows[:1])
    assert odd["input_ids"].shape == (1, 8) and odd["cu_seq_lens_q"].tolist() == [0, 3, 6, 8]
    assert odd["labels"][0, 6:].tolist() == [-100, -100] and odd["position_ids"][0, 6:].tolist() == [0, 1]


def _docs_alone(model, ids, spans):
    return torch.cat([model(input_ids=ids[:, a:b]).logits for a, b in spans], 1)


def test_packed_rows_match_each_document_alone_with_and_without_boundaries(tiny_model_dir):
    torch.manual_seed(0)
    spans = ((0, 40), (40, 56), (56, 96))
    ids = torch.randint(10, 500, (2, 96))
    pos = torch.cat([torch.arange(b - a) for a, b in spans]).repeat(2, 1)
    loaded = load_model(str(tiny_model_dir), dtype="float32", attn="varlen", gradient_checkpointing=False)
    assert loaded.attn_implementation == varlen.ATTN_NAME
    plain = load_model(str(tiny_model_dir), dtype="float32", attn="sdpa", gradient_checkpointing=False).model
    cu = document_boundaries(pos.tolist(), [96, 96], 96)
    bounds = {"cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32), "max_length_q": 96}
    with torch.no_grad():
        alone = _docs_alone(plain, ids, spans)
        with_cu = loaded.model(input_ids=ids, position_ids=pos, use_cache=False, **bounds).logits
        masked = loaded.model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(with_cu, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-4)


def test_padded_rows_and_generation_match_sdpa(tiny_model_dir):
    torch.manual_seed(1)
    ids = torch.randint(10, 500, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    sdpa = load_model(str(tiny_model_dir), dtype="float32", attn="sdpa", gradient_checkpointing=False).model
    ours = load_model(str(tiny_model_dir), dtype="float32", attn="varlen", gradient_checkpointing=False).model
    cu = torch.tensor(document_boundaries(None, [24, 17], 24), dtype=torch.int32)
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=mask).logits
        got_cu = ours(input_ids=ids, attention_mask=mask, cu_seq_lens_q=cu, max_length_q=24).logits
        got_mask = ours(input_ids=ids, attention_mask=mask).logits
    for got in (got_cu, got_mask):
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1, :17], want[1, :17], rtol=1e-4, atol=1e-4)

    def greedy(attn: str) -> list[list[int]]:
        keys = {"model_name_or_path": str(tiny_model_dir), "template": "qwen", "flash_attn": attn}
        engine = load_engine(tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()]))
        prompts = [
            engine.prompt_ids([{"role": "user", "content": t}]) for t in ("Hi", "A longer question here")
        ]
        return [
            [c.token_ids for c in r]
            for r in engine.generate(prompts, SamplingSettings(max_new_tokens=6, do_sample=False))
        ]

    assert greedy("varlen") == greedy("sdpa")  # left-padded prompts, then the KV cache: the masked path


def _reference_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                      scale=None, enable_gqa=False, return_aux=None):  # fmt: skip
    """Stand-in for torch's CUDA varlen_attn, with its current signature."""
    assert cu_seq_q.dtype == torch.int32 and max_q == max_k and cu_seq_q is cu_seq_k
    assert window_size[1] == 0, "always causal"
    window = None if window_size[0] < 0 else window_size[0] + 1
    if key.shape[1] != query.shape[1]:
        assert enable_gqa
    return varlen.reference_varlen(query, key, value, cu_seq_q, max_q, scale, window)


def test_flash_adapter_maps_causality_scale_and_gqa(monkeypatch):
    from torch.nn.attention import varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", _reference_kernel)
    api = varlen.KernelApi.of(_reference_kernel)
    assert api == varlen.KernelApi(window=True, scale=True, gqa=True)
    torch.manual_seed(2)
    q, k, v = (torch.randn(20, h, 8, dtype=torch.bfloat16) for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    want = varlen.reference_varlen(q, k, v, cu, 13, 0.3, None)
    torch.testing.assert_close(varlen.flash_varlen(q, k, v, cu, 13, 0.3, None, api), want)
    windowed = varlen.reference_varlen(q, k, v, cu, 13, 0.3, 4)
    torch.testing.assert_close(varlen.flash_varlen(q, k, v, cu, 13, 0.3, 4, api), windowed)
    assert not torch.allclose(windowed, want)

    def old_api(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        """torch 2.10's signature: no scale, no GQA, no window."""
        assert is_causal and key.shape[1] == query.shape[1]
        return varlen.reference_varlen(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5, None)

    monkeypatch.setattr(torch_varlen, "varlen_attn", old_api)
    old = varlen.KernelApi.of(old_api)
    assert old == varlen.KernelApi(window=False, scale=False, gqa=False)
    # the scale is folded into q (one more bf16 rounding)
    torch.testing.assert_close(
        varlen.flash_varlen(q, k, v, cu, 13, 0.3, None, old), want, atol=0.01, rtol=0.02
    )
    with pytest.raises(TunesmithError, match="sliding-window.*upgrade torch"):
        varlen.flash_varlen(q, k, v, cu, 13, 0.3, 4, old)


def test_fp32_activations_reach_the_kernel_in_the_autocast_dtype_or_are_refused(monkeypatch):
    """Full fine-tuning keeps fp32 weights under bf16 autocast: q/k/v arrive in fp32 (found on an H200)."""
    from torch.nn.attention import varlen as torch_varlen

    seen = []

    def kernel(query, key, value, *args, **kw):
        seen.append({x.dtype for x in (query, key, value)})
        return _reference_kernel(query, key, value, *args, **kw)

    monkeypatch.setattr(torch_varlen, "varlen_attn", kernel)
    api = varlen.KernelApi(window=True, scale=True, gqa=True)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen.flash_varlen(q, k, v, cu, 7, 8**-0.5, None, api)
    assert seen == [{torch.bfloat16}] and out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), varlen.reference_varlen(q, k, v, cu, 7, 8**-0.5, None), atol=0.03, rtol=0.03
    )
    with pytest.raises(TunesmithError, match="float32 without mixed precision.*bf16: true"):
        varlen.flash_varlen(q, k, v, cu, 7, 8**-0.5, None, api)
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # q already half, v still fp32: both reach the kernel in bf16
        varlen.flash_varlen(q.bfloat16(), k, v, cu, 7, 8**-0.5, None, api)
    assert seen[-1] == {torch.bfloat16}
    with pytest.raises(TunesmithError, match="torch.bfloat16, torch.float32 without mixed precision"):
        varlen.flash_varlen(q.bfloat16(), k, v, cu, 7, 8**-0.5, None, api)


def test_preflight_refuses_fp32_and_reports_a_failing_kernel(monkeypatch):
    api = varlen.KernelApi(window=True, scale=True, gqa=True)
    with pytest.raises(TunesmithError, match="takes bf16 or fp16.*use flash_attn: sdpa"):
        varlen.preflight(api, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    # no CUDA here: the tiny forward fails, and the error names torch, the GPU and the fix
    with pytest.raises(
        TunesmithError, match="failed a forward \\+ backward on a test GPU.*use flash_attn: sdpa"
    ):
        varlen.preflight(api, torch.bfloat16)


def test_training_with_varlen_matches_sdpa_packed_and_padded(monkeypatch, tiny_model_dir, sft_data, tmp_path):
    calls: list[int] = []
    real = varlen.reference_varlen

    def spy(q, k, v, cu, *rest):
        calls.append(len(cu) - 1)  # documents in the batch
        return real(q, k, v, cu, *rest)

    monkeypatch.setattr(varlen, "reference_varlen", spy)
    for packing in (True, False):
        keys = {"packing": packing, "max_steps": 4, "cutoff_len": 256}
        train(tiny_model_dir, sft_data, tmp_path / f"sdpa{packing}", flash_attn="sdpa", **keys)
        calls.clear()
        train(tiny_model_dir, sft_data, tmp_path / f"varlen{packing}", flash_attn="varlen", **keys)
        rows = 4  # per_device_train_batch_size
        if packing:
            assert calls and max(calls) > rows, "several documents a row"
        else:
            assert calls and set(calls) == {rows}, (
                "one row of the 4 documents, no padding (fp32: no multiple)"
            )
        want = logged_losses(tmp_path / f"sdpa{packing}")
        got = logged_losses(tmp_path / f"varlen{packing}")
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
        assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-5), packing


@pytest.mark.parametrize("stage", ["pt", "weighted-sft"])
def test_padding_free_batches_match_padded_ones_for_pt_and_weighted_rows(stage, tiny_model_dir, tmp_path):
    """pt trains every token (the masked first label of each document matters), weighted rows carry
    loss_weights: both flattened by flash_attn: varlen and padded by sdpa give the same losses."""
    if stage == "pt":
        data, keys = write_pt_data(tmp_path / "pt.jsonl"), {"stage": "pt", "packing": False}
    else:
        data, keys = write_weighted_sft_data(tmp_path / "w.json"), {}
    keys |= {"max_steps": 3, "cutoff_len": 64}
    train(tiny_model_dir, data, tmp_path / "sdpa", flash_attn="sdpa", **keys)
    train(tiny_model_dir, data, tmp_path / "varlen", flash_attn="varlen", **keys)
    want, got = logged_losses(tmp_path / "sdpa"), logged_losses(tmp_path / "varlen")
    assert len(got) == 3 and [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-5)


def test_neftune_keeps_batches_padded(monkeypatch, tiny_model_dir, sft_data, tmp_path):
    """NEFTune scales its noise by the row length: with it, auto never picks varlen's one-row batches (the
    loader is told there are no boundaries), and an explicit varlen is refused when the config loads."""
    from tunesmith.config import load_config
    from tunesmith.training import causal_lm

    class Loaded(Exception):
        """Raised by the stand-in loader: the run stops once the loader's arguments are seen."""

    seen: dict = {}

    def loader(cfg, tokenizer, dtype, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(causal_lm, "_load_model", loader)  # run_steps imports it per run
    for alpha, padding_free in ((None, True), (5.0, False)):
        keys = {"neftune_noise_alpha": alpha} if alpha else {}
        with pytest.raises(Loaded):
            train(tiny_model_dir, sft_data, tmp_path / f"n{alpha}", **keys)
        assert seen["padding_free"] is padding_free
    with pytest.raises(ConfigError, match="NEFTune.*sqrt.*use flash_attn: auto"):
        load_config(None, ["flash_attn=varlen", "neftune_noise_alpha=5"])
    load_config(None, ["flash_attn=varlen", "neftune_noise_alpha=5", "stage=dpo"])  # DPO: no one-row batches


def test_unsupported_model_features_and_missing_api_are_refused(monkeypatch):
    class Attn(torch.nn.Module):
        is_causal = True

    q = torch.zeros(1, 2, 4, 8)
    forward = varlen.make_attention_forward(varlen.KernelApi(window=True, scale=True, gqa=True))
    with pytest.raises(TunesmithError, match="logit soft-capping.*use flash_attn: sdpa"):
        forward(Attn(), q, q, q, None, softcap=50.0)
    from tunesmith.model import loader

    monkeypatch.setattr(varlen, "available", lambda: False)
    with pytest.raises(TunesmithError, match="varlen needs PyTorch's varlen attention"):
        loader.resolve_attn("varlen", cuda=False, dtype=torch.float32)


def test_models_with_soft_capped_attention_are_refused_when_loaded():
    from transformers import Gemma2Config, Qwen2Config

    varlen.check_model(Qwen2Config(attention_dropout=0.0))
    with pytest.raises(
        TunesmithError, match="Gemma2Config uses attention logit soft-capping.*flash_attn: sdpa"
    ):
        varlen.check_model(Gemma2Config())
    with pytest.raises(TunesmithError, match="attention dropout"):
        varlen.check_model(Qwen2Config(attention_dropout=0.1))


def test_auto_picks_varlen_on_a_gpu_for_padding_free_training_only(monkeypatch):
    """`flash_attn: auto` -> varlen for pt/sft training on a GPU (1.41x SDPA's tokens/s, compiled, H100),
    sdpa where varlen cannot compute the model, cannot run here, or no boundaries will come."""
    from transformers import Gemma2Config, Qwen2Config

    from tunesmith.model import loader

    calls = []
    monkeypatch.setattr(varlen, "register", lambda **kw: calls.append(kw) or varlen.ATTN_NAME)
    bf16, qwen = torch.bfloat16, Qwen2Config(attention_dropout=0.0)
    assert (
        loader.resolve_attn("auto", cuda=True, dtype=bf16, config=qwen, padding_free=True) == varlen.ATTN_NAME
    )
    assert calls == [
        {"cuda": True, "dtype": bf16, "head_size": 128, "kernel": "auto"}
    ]  # the preflight runs at the model's head size
    for attn in ("auto", "varlen"):  # varlen_kernel reaches the registration either way
        loader.resolve_attn(attn, cuda=True, dtype=bf16, config=qwen, padding_free=True, varlen_kernel="fa4")
        assert calls.pop()["kernel"] == "fa4"
    assert loader.resolve_attn("auto", cuda=True, dtype=bf16, config=qwen) == "sdpa"  # no boundaries: DPO
    assert (
        loader.resolve_attn("auto", cuda=False, dtype=torch.float32, config=qwen, padding_free=True) == "sdpa"
    )
    assert (
        loader.resolve_attn("auto", cuda=True, dtype=torch.float32, config=qwen, padding_free=True) == "sdpa"
    )
    assert (
        loader.resolve_attn("auto", cuda=True, dtype=bf16, config=Gemma2Config(), padding_free=True) == "sdpa"
    )

    # models with their own attention code (bloom, falcon, ...) and remote code would ignore the boundaries
    from transformers import BloomConfig

    assert (
        loader.resolve_attn("auto", cuda=True, dtype=bf16, config=BloomConfig(), padding_free=True) == "sdpa"
    )
    remote = Qwen2Config(attention_dropout=0.0)
    remote.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    assert loader.resolve_attn("auto", cuda=True, dtype=bf16, config=remote, padding_free=True) == "sdpa"
    with pytest.raises(TunesmithError, match="BloomConfig uses its own attention code.*flash_attn: sdpa"):
        varlen.check_model(BloomConfig())
    assert len(calls) == 1

    def failing(**kw):
        raise TunesmithError("flash_attn: varlen: ... failed a forward + backward")

    monkeypatch.setattr(varlen, "register", failing)
    assert loader.resolve_attn("auto", cuda=True, dtype=bf16, config=qwen, padding_free=True) == "sdpa"
    monkeypatch.setattr(varlen, "available", lambda: False)
    assert loader.resolve_attn("auto", cuda=True, dtype=bf16, config=qwen, padding_free=True) == "sdpa"


def test_pt_and_sft_training_load_their_model_padding_free(monkeypatch, tiny_model_dir, tmp_path):
    """... so `auto` may pick varlen there (DPO's counterpart is in test_pref_stages)."""
    from tunesmith.model import loader

    seen, original = [], loader.load_model
    monkeypatch.setattr(
        loader, "load_model", lambda *a, **kw: seen.append(kw.get("padding_free")) or original(*a, **kw)
    )
    train(
        tiny_model_dir,
        write_pt_data(tmp_path / "d.json"),
        tmp_path / "out",
        stage="pt",
        max_steps=1,
        cutoff_len=64,
    )
    assert seen == [True]
