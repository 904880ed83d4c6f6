"""export_quantization_bit through bitsandbytes (runs on CPU with bitsandbytes >= 0.48), and hub upload errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import tunesmith
from tests.export.conftest import needs_bnb
from tunesmith.errors import TunesmithError
from tunesmith.export.quantize import require_bitsandbytes
from tunesmith.export.run import push_to_hub, run


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_reloads_generates_and_reports_drift(
    bits: int, tiny_model_dir: Path, trained_lora: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    keys = {
        "model_name_or_path": tiny_model_dir, "adapter_name_or_path": trained_lora, "template": "qwen",
        "export_dir": out, "export_quantization_bit": bits, "export_check_max_new_tokens": 16,
    }  # fmt: skip
    report = run(tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()]))
    assert report.ok and report.quantization_bit == bits and report.logits.passed
    assert report.reload.passed and report.reload.max_abs_diff == 0.0  # folder == quantized model in memory
    drift = report.quant_drift
    assert drift.bits == bits and 0.5 < drift.top1_agreement <= 1.0 and drift.max_abs_diff > 0
    assert len(report.stop.finish_reasons) == 8
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit" if bits == 4 else "load_in_8bit"] is True
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert not (out / ".quantized").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    assert layer == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert f"{bits}-bit quantization drift" in (out / "README.md").read_text()


def test_missing_bitsandbytes_names_the_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(TunesmithError, match=r"install tunesmith\[bnb\] \(bitsandbytes\)"):
        require_bitsandbytes(4)


def test_hub_upload_offline_says_the_local_export_is_complete(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TunesmithError) as err:
        push_to_hub(tmp_path, "someone/capitals")
    text = str(err.value)
    assert (
        "uploading to 'someone/capitals' failed" in text and f"local export in {tmp_path} is complete" in text
    )
