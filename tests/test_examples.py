"""Every config in examples/ loads, and passes `tunesmith check` up to model loading (the hub model id is
replaced by the local tiny tokenizer, the data by LLaMA-Factory's demo data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.demo_data import demo_data_dir
from tunesmith.tiny import tiny_tokenizer_dir

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {
        "qwen2.5_lora_sft.yaml",
        "llama3.1_lora_sft.yaml",
        "qwen2.5_qlora_sft.yaml",
        "llama3.1_full_sft_ds3.yaml",
        "qwen2.5_pt.yaml",
        "sft_from_jsonl.yaml",
        "qwen2.5_lora_sft_fast.yaml",  # docs/performance.md's two recipes
        "qwen2.5_lora_sft_low_memory.yaml",
        "llama3.2_full_sft_low_memory.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check(path, tmp_path, capsys, lf_data):
    cfg = load_config(path)
    assert cfg.training.output_dir
    overrides = [f"model_name_or_path={tiny_tokenizer_dir()}", "max_samples=40"]
    if path.name == "sft_from_jsonl.yaml":
        rows = [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)
        ]
        for split in ("train", "test"):
            (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        overrides += [f"dataset={tmp_path / 'train.jsonl'}", f"eval_dataset={tmp_path / 'test.jsonl'}"]
    elif path.name.startswith("demo_"):
        overrides += [f"dataset_dir={demo_data_dir()}"]
    else:
        overrides += [f"dataset_dir={lf_data}"]
    code = main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "usable: yes" in out
