"""The export's own checks: a tampered merge is caught (fp32 and bf16), shards, several adapters, stop test, probes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.export.conftest import BF16_CPU_NOISE, BF16_CPU_NOISE_REASON
from tunesmith.errors import TunesmithError
from tunesmith.export import merge
from tunesmith.export.checks import default_tolerance, logits_check, probe_logits, stop_test
from tunesmith.export.probes import BUILTIN_PROMPTS, builtin_probes, probes_for
from tunesmith.export.report import REPORT_NAME
from tunesmith.export.run import run
from tunesmith.model.loader import load_tokenizer
from tunesmith.training.setup import template_for


def _setup(base: Path, adapter: Path):
    tok = load_tokenizer(adapter)
    cfg = tunesmith.load_config(None, [f"model_name_or_path={base}", "template=qwen"])
    template = template_for(cfg, tok)
    return tok, template, builtin_probes(tok, template, 4)


def _double_scaling(peft_model) -> None:
    """The classic merge bug: alpha/r applied twice."""
    for module in peft_model.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            for name in module.scaling:
                module.scaling[name] *= 2


def _drop_mlp_delta(model, base: Path) -> None:
    """A partial merge: the MLP modules keep the base weights (a merge that missed some target modules)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(base, dtype=model.dtype)
    with torch.no_grad():
        for layer, orig in zip(model.model.layers, original.model.layers):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, name).weight.copy_(getattr(orig.mlp, name).weight)


def _merge_and_check(base: Path, adapter: Path, tamper: str):
    tok, _, probes = _setup(base, adapter)
    model, dtype = merge.load_base(base, tok, device="cpu")
    peft_model = merge.attach_adapters(model, [str(adapter)])
    reference = probe_logits(peft_model, probes)
    with peft_model.disable_adapter():
        base_logits = probe_logits(peft_model, probes)
    if tamper == "scaling":
        _double_scaling(peft_model)
    merged = merge.merge_adapters(peft_model)
    if tamper == "partial":
        _drop_mlp_delta(merged, base)
    return logits_check(
        reference, probe_logits(merged, probes), base_logits, dtype=dtype, tolerance=None
    ), dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tamper", ["none", "scaling", "partial"])
def test_logits_check_passes_a_correct_merge_and_catches_a_tampered_one(
    precision: str, tamper: str, tiny_model_dir: Path, tiny_bf16_dir: Path, trained_lora: Path
) -> None:
    if precision == "bf16" and tamper == "none" and BF16_CPU_NOISE:
        pytest.skip(BF16_CPU_NOISE_REASON)
    base = tiny_model_dir if precision == "fp32" else tiny_bf16_dir
    check, dtype = _merge_and_check(base, trained_lora, tamper)
    assert dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    assert check.conclusive  # the adapter moves logits well beyond the tolerance
    if tamper == "none":
        assert check.passed, check
    else:
        assert not check.passed, check


def test_a_tampered_merge_fails_the_export_and_writes_no_weights(
    tiny_model_dir: Path, trained_lora: Path, tmp_path: Path, monkeypatch
) -> None:
    def tampered(peft_model):
        _double_scaling(peft_model)
        return peft_model.merge_and_unload()

    monkeypatch.setattr(merge, "merge_adapters", tampered)
    out = tmp_path / "export"
    cfg = tunesmith.load_config(
        None,
        [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={trained_lora}", "template=qwen",
         f"export_dir={out}"],
    )  # fmt: skip
    with pytest.raises(TunesmithError, match="export check failed: the merged model's logits differ"):
        run(cfg)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["ok"] is False and not report["logits"]["passed"] and "tolerance" in report["error"]
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME]


def test_default_tolerance_scales_with_dtype_and_logits() -> None:
    assert default_tolerance(torch.float32, 0.2) == pytest.approx(1e-3)  # at least 1 x the share
    assert default_tolerance(torch.bfloat16, 20.0) == pytest.approx(1.0)
    assert default_tolerance(torch.float16, 20.0) == pytest.approx(0.2)


def test_several_adapters_equal_merging_them_in_order(tiny_model_dir: Path, trained_lora: Path) -> None:
    from tunesmith.infer.hf_engine import _with_adapters

    tok, _, probes = _setup(tiny_model_dir, trained_lora)
    model, _ = merge.load_base(tiny_model_dir, tok, device="cpu")
    together = merge.merge_adapters(merge.attach_adapters(model, [str(trained_lora)] * 2))
    one_by_one = _with_adapters(merge.load_base(tiny_model_dir, tok, device="cpu")[0], (str(trained_lora),) * 2,
                                quantized=False)  # fmt: skip
    once = _with_adapters(merge.load_base(tiny_model_dir, tok, device="cpu")[0], (str(trained_lora),),
                          quantized=False)  # fmt: skip
    a, b, c = (probe_logits(m, probes) for m in (together, one_by_one, once))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    assert not all(torch.allclose(x, y, atol=1e-2) for x, y in zip(a, c))


def test_shards_respect_a_small_size_and_reload(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    limit = 300_000
    files = merge.save_weights(model, tmp_path, max_shard_size=limit)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    for name in shards:  # a tensor larger than the limit gets a shard of its own
        assert (tmp_path / name).stat().st_size <= max(limit, biggest) + 100_000
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_stop_test_reports_and_warns_when_answers_run_on(tiny_model_dir: Path, caplog) -> None:
    from transformers import AutoModelForCausalLM

    tok, template, probes = _setup(tiny_model_dir, tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # untrained: never says <|im_end|>
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        result = stop_test(model, tok, template, probes, max_new_tokens=6, source="built-in")
    assert result.finish_reasons == ["length"] * 4 and result.stop_share == 0.0
    assert result.completion_tokens == [6] * 4
    assert "STOP TEST: only 0 of 4" in caplog.text and "template" in caplog.text


def test_probes_fall_back_to_builtin_prompts(
    tiny_model_dir: Path, tmp_path: Path, capital_data: Path, caplog
) -> None:
    tok, template, _ = _setup(tiny_model_dir, tiny_model_dir)
    base = [f"model_name_or_path={tiny_model_dir}", "template=qwen", f"data_cache_dir={tmp_path / 'cache'}"]
    probes, source = probes_for(tunesmith.load_config(None, base), tok, template, 10)
    assert source == "built-in prompts" and len(probes) == 10
    assert probes[0].messages[0]["content"] == BUILTIN_PROMPTS[0] == probes[8].messages[0]["content"]

    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        cfg = tunesmith.load_config(None, [*base, f"dataset={tmp_path / 'gone.json'}"])
        probes, source = probes_for(cfg, tok, template, 3)
    assert source == "built-in prompts" and "not readable here" in caplog.text

    cfg = tunesmith.load_config(None, [*base, f"eval_dataset={capital_data}", "max_samples=2"])
    probes, source = probes_for(cfg, tok, template, 3)
    assert source == f"eval_dataset {capital_data} + 1 built-in"
    assert probes[0].messages == [{"role": "user", "content": "Name the capital city number 0."}]
    rendered = template.render(probes[0].messages, add_generation_prompt=True).text
    assert probes[0].ids == tok.backend_tokenizer.encode(rendered, add_special_tokens=False).ids
