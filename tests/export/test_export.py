"""`tunesmith export` end to end: round trip against adapter inference, full model, QLoRA config, refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import tunesmith
from tests.export.conftest import BF16_CPU_NOISE, BF16_CPU_NOISE_REASON
from tunesmith.data.stops import stop_token_ids
from tunesmith.data.template_jinja import to_jinja
from tunesmith.data.templates import get_template
from tunesmith.errors import ConfigError
from tunesmith.export.report import REPORT_NAME
from tunesmith.export.run import run

QUESTIONS = [[{"role": "user", "content": f"Name the capital city number {i}."}] for i in range(4)]


def export_cfg(model: Path, out: Path, **over):
    keys = {
        "model_name_or_path": model,
        "template": "qwen",
        "export_dir": out,
        "export_check_max_new_tokens": 32,
    }
    return tunesmith.load_config(None, [f"{k}={v}" for k, v in {**keys, **over}.items()])


def _plain_greedy(folder: Path, messages) -> list[int]:
    """Greedy answer ids from the exported folder with transformers alone (its chat template, its stop ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=24)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_round_trip_equals_adapter_inference(
    tiny_model_dir: Path, trained_lora: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.engine import load_engine
    from tunesmith.infer.hf_engine import HFEngine
    from tunesmith.infer.settings import SamplingSettings

    out = tmp_path / "export"
    report = run(export_cfg(tiny_model_dir, out, adapter_name_or_path=trained_lora))
    assert report.ok and report.logits.passed and report.logits.conclusive
    assert report.logits.max_abs_diff < 1e-4 < report.logits.adapter_effect
    assert report.reload.max_abs_diff == 0.0
    assert report.reload.template_matches == report.reload.template_total == 8
    assert len(report.stop.finish_reasons) == 8 and report.stop.stop_share > 0.5
    assert "(training rows, not held out)" in report.probe_source  # the data came from the adapter's run.json
    assert json.loads((out / REPORT_NAME).read_text())["ok"] is True
    assert (out / "README.md").read_text().count("## ") >= 4
    assert "FROM ." in (out / "Modelfile").read_text().splitlines() and not report.notes

    # The chat template is in tokenizer_config.json, and every stop id in generation_config.json.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    template = get_template("qwen").bind(tok.bos_token, tok.eos_token)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == to_jinja(template)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(eos) == sorted(stop_token_ids(tok, template)) and len(eos) == 2

    # Same greedy answers: plain transformers on the export, the engine with the adapter (merged at load),
    # and the adapter left unmerged on the base.
    settings = SamplingSettings(do_sample=False, max_new_tokens=24)
    engine = load_engine(export_cfg(tiny_model_dir, tmp_path / "unused", adapter_name_or_path=trained_lora))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_lora)
    unmerged = HFEngine.build(peft.eval(), engine.tokenizer, engine.template, name="unmerged")
    stopped = 0
    for messages in QUESTIONS:
        ids = engine.prompt_ids(messages)
        merged_answer = engine.generate([ids], settings)[0][0].token_ids
        assert unmerged.generate([ids], settings)[0][0].token_ids == merged_answer
        assert _plain_greedy(out, messages) == merged_answer
        stopped += merged_answer[-1] in eos
    assert stopped >= 2  # the comparison covers answers that end on a stop token


def test_full_model_is_reexported_with_checks(trained_full: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "export"
    report = run(export_cfg(trained_full, out))
    assert report.ok and not report.logits.ran and "no adapters" in report.logits.skipped_reason
    assert report.reload.passed and report.reload.max_abs_diff == 0.0
    assert report.stop.stop_share >= 0.5
    assert "logits vs base + adapter: skipped (no adapters" in report.summary()
    before, after = load_file(trained_full / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    card = (out / "README.md").read_text()
    assert "finetuning_type=full" in card and "Steps: 40" in card and "train_loss=" in card


@pytest.mark.skipif(BF16_CPU_NOISE, reason=BF16_CPU_NOISE_REASON)
def test_qlora_config_merges_into_the_16bit_base(
    tiny_bf16_dir: Path, trained_lora: Path, tmp_path: Path, caplog
) -> None:
    # On this CPU-only machine a 4-bit load raises (no CUDA), so finishing proves the base loaded unquantized.
    out = tmp_path / "export"
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        report = run(export_cfg(tiny_bf16_dir, out, adapter_name_or_path=trained_lora, quantization_bit=4))
    assert "quantization_bit=4 ignored" in caplog.text
    assert report.ok and report.dtype == "bfloat16" and report.quantization_bit is None
    assert report.logits.passed and report.logits.tolerance_source == "default for bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_reexport_replaces_an_earlier_export_and_keeps_user_files(trained_full: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    run(export_cfg(trained_full, out, export_check=False))
    (out / "notes.txt").write_text("mine")
    report = run(export_cfg(trained_full, out, export_check=False))
    assert report.ok and (out / "notes.txt").read_text() == "mine" and "notes.txt" in report.files
    assert report.logits is not None and report.reload is None and report.stop is None


def test_template_auto_export_uses_the_tokenizers_template_and_skips_the_modelfile(
    trained_full: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    report = run(export_cfg(trained_full, out, template="auto"))
    assert report.ok and report.template == "auto" and report.reload.template_matches == 8
    assert not (out / "Modelfile").exists() and "no Ollama Modelfile" in report.notes[0]
    assert "ollama create" not in (out / "README.md").read_text()
    saved = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == (trained_full / "chat_template.jinja").read_text()


def test_refusals_are_reported_together_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    cfg = export_cfg(
        tiny_model_dir,
        busy,
        adapter_name_or_path=f"{tmp_path / 'nowhere'},{tmp_path}",
        export_legacy_format=True,
    )
    with pytest.raises(ConfigError) as err:
        run(cfg)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "export_dir: is not empty and holds no export_report.json" in text
    assert "adapter_name_or_path: does not exist" in text and "has no adapter_config.json" in text
    assert "export_legacy_format: transformers 5 saves safetensors only" in text
    with pytest.raises(
        ConfigError, match=r"(?s)2 problem.*model_name_or_path: is not set.*export_dir: is not set"
    ):
        run(tunesmith.load_config(None, []))


def test_transformers_has_no_legacy_bin_saving() -> None:
    """The reason export_legacy_format is refused; fails once save_pretrained can write .bin again."""
    import inspect

    from transformers import PreTrainedModel

    assert "safe_serialization" not in inspect.signature(PreTrainedModel.save_pretrained).parameters
