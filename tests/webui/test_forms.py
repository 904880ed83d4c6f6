"""Form helpers: fields from the config schema, form values to a valid config, previews and tables."""

from __future__ import annotations

import dataclasses
import io
import json
import shlex
import time
import typing
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config, parse_override_value
from tunesmith.config_schema import DataArgs, FinetuningArgs, ModelArgs
from tunesmith.config_types import hf_training_fields
from tunesmith.webui.forms import (
    ALL_FIELDS,
    TRAIN_FIELDS,
    command_text,
    config_errors,
    dataset_names,
    guess_template,
    predictions_table,
    preview_html,
    train_config,
    yaml_text,
)

REPO = Path(__file__).resolve().parents[2]
HF_TOKENIZERS = REPO.parent / "shared" / "fixtures" / "hf_tokenizers"
LF_DATA = REPO.parent / "shared" / "compat" / "llamafactory-data"


def test_fields_come_from_the_schema() -> None:
    fields = {f.key: f for f in TRAIN_FIELDS}
    for cls in (ModelArgs, DataArgs, FinetuningArgs):
        for f in dataclasses.fields(cls):
            assert fields[f.name].help == f.metadata["help"], f.name
    assert (fields["lora_rank"].kind, fields["lora_rank"].default, fields["lora_rank"].group) == (
        "number",
        8,
        "lora",
    )
    assert fields["stage"].kind == "choice" and fields["stage"].choices == typing.get_args(
        typing.get_type_hints(FinetuningArgs)["stage"]
    )
    assert (fields["trust_remote_code"].kind, fields["packing"].choices) == ("bool", ("true", "false"))
    assert (fields["lora_target"].kind, fields["lora_target"].default) == ("text", "all")
    assert fields["num_generations"].stages == ("grpo",) and fields["pref_beta"].stages == ("dpo", "kto")
    assert fields["temperature"].stages == ("ppo", "grpo") and fields["dataset"].stages == ()
    hf = hf_training_fields()
    assert fields["learning_rate"].default == hf["learning_rate"].default
    assert fields["lr_scheduler_type"].kind == "choice" and "cosine" in fields["lr_scheduler_type"].choices
    assert {"export_dir", "api_port", "task"} <= {f.key for f in ALL_FIELDS} - set(fields)
    assert len({f.key for f in ALL_FIELDS}) == len(ALL_FIELDS)


def test_train_config_keeps_what_the_user_set_typed() -> None:
    values = {
        "model_name_or_path": " tiny ", "template": "", "lora_rank": 8.0, "lora_alpha": 32.0,
        "learning_rate": "1e-4", "dataset": "a, b", "lora_target": "all", "packing": "true",
        "enable_thinking": None, "bf16": False, "max_steps": 12.0, "lr_scheduler_type": "linear",
        "num_train_epochs": 3, "cutoff_len": "oops", "my_key": "kept",
    }  # fmt: skip
    assert train_config(values) == {
        "model_name_or_path": "tiny", "lora_alpha": 32, "learning_rate": 1e-4, "dataset": ["a", "b"],
        "packing": True, "max_steps": 12, "cutoff_len": "oops", "my_key": "kept",
    }  # fmt: skip
    assert isinstance(train_config({"lora_alpha": 32.0})["lora_alpha"], int)


def test_config_errors_are_the_loaders_problems() -> None:
    good = train_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "lora_rank": 16})
    assert config_errors(good) == []
    errors = config_errors(good | {"lora_rank": 0, "stage": "sfx", "learnig_rate": 1e-4})
    assert len(errors) == 3
    assert errors[0].startswith("lora_rank: out of range | got 0")
    assert "did you mean sft?" in errors[1] and "did you mean learning_rate" in errors[2]
    assert not any("(override)" in e for e in errors)


def test_yaml_text_round_trips() -> None:
    cfg = {"dataset": ("a", "b"), "default_system": "你好: be kind", "max_samples": None, "val_size": 0.1,
           "nested": {"k": [1, 2]}, "output_dir": Path("out/x"), "flag": "yes"}  # fmt: skip
    text = yaml_text(cfg)
    assert "你好" in text and list(yaml.safe_load(text)) == list(cfg)
    assert yaml.safe_load(text) == cfg | {"dataset": ["a", "b"], "output_dir": "out/x"}


def test_command_text_gives_the_file_and_the_override_form() -> None:
    cfg = {"model_name_or_path": "my model", "dataset": ["a", "b"], "learning_rate": 1e-4, "packing": True,
           "default_system": "be: kind", "max_samples": None}  # fmt: skip
    text = command_text("train", cfg, path="run.yaml")
    assert text.startswith("tunesmith train run.yaml\n") and "# run.yaml\n" in text
    assert yaml.safe_load(text.split("# run.yaml\n")[1].split("\n# or")[0]) == cfg
    line = text.rstrip("\n").splitlines()[-1]
    words = shlex.split(line)
    assert words[:2] == ["tunesmith", "train"]
    parsed = dict((k, parse_override_value(v)) for k, _, v in (w.partition("=") for w in words[2:]))
    assert parsed == cfg | {"dataset": "a,b"}  # lists travel as comma strings, which the loader splits
    assert load_config(None, words[2:]).data.dataset == ("a", "b")
    assert "without a file" not in command_text("train", {"nested": {"a": 1}})


def test_dataset_names(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps({"b_set": {"file_name": "b.json"}, "a_set": {}}))
    assert dataset_names(str(tmp_path)) == ["b_set", "a_set"]
    assert dataset_names(str(tmp_path / "absent")) == []
    (tmp_path / "dataset_info.json").write_text('{"torn": ')
    assert dataset_names(str(tmp_path)) == []
    if (LF_DATA / "dataset_info.json").exists():
        assert "alpaca_en_demo" in dataset_names(str(LF_DATA))


@pytest.mark.parametrize(
    ("fixture", "template"),
    [("qwen2.5-instruct", "qwen"), ("llama-2-chat", "llama2"), ("phi-3-mini-4k-instruct", "phi3"),
     ("gpt2", "auto"), ("falcon-40b", "auto")],
)  # fmt: skip
def test_guess_template_from_the_tokenizers_chat_template(fixture: str, template: str) -> None:
    folder = HF_TOKENIZERS / fixture
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    assert guess_template(str(folder)) == template


def test_guess_template_offline_or_missing_is_auto_at_once(tmp_path: Path) -> None:
    from tunesmith.tiny import tiny_tokenizer_dir

    t0 = time.monotonic()
    assert guess_template("someone/not-a-cached-model") == "auto"  # HF_HUB_OFFLINE: no network wait
    assert guess_template(str(tmp_path / "absent")) == "auto"
    assert guess_template("  ") == "auto"
    assert time.monotonic() - t0 < 10
    assert guess_template(str(tiny_tokenizer_dir())) == "chatml"  # the tiny tokenizer's own template


def test_preview_html_of_real_check_output(tmp_path: Path) -> None:
    from tunesmith.check import run_check
    from tunesmith.tiny import tiny_tokenizer_dir

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say <b> & hi", "output": "Hi <there>"}] * 3))
    cfg = load_config(None, {"model_name_or_path": str(tiny_tokenizer_dir()), "dataset": str(data),
                             "template": "chatml", "data_cache_dir": str(tmp_path / "cache")})  # fmt: skip
    out = io.StringIO()
    assert run_check(cfg, out=out, colour=False) == 0
    page = preview_html(out.getvalue())
    assert page.startswith('<pre class="ts-check">') and page.endswith("</pre>")
    assert '<mark class="ts-supervised">Hi &lt;there&gt;&lt;|im_end|&gt;</mark>' in page
    assert 'supervised tokens are <mark class="ts-supervised">highlighted</mark>' in page
    assert "Say &lt;b&gt; &amp; hi" in page and "⟦" not in page and "⟧" not in page
    assert "<b>== verdict ==</b>" in page
    coloured = preview_html("\x1b[1;32mgreen\x1b[0m ⟦open to the end")
    assert coloured == '<pre class="ts-check">green <mark class="ts-supervised">open to the end</mark></pre>'


def test_predictions_table_merges_scores_by_id(tmp_path: Path) -> None:
    from tunesmith.infer.score import score_file

    path = tmp_path / "predictions.jsonl"
    rows = [
        {"id": f"s{i}", "prompt": f"q{i}", "predict": "B" if i % 2 else "A", "label": "A"} for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert predictions_table(path, limit=2, offset=1) == rows[1:3]  # no scores file yet
    score_file(path, workers=1)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\nnot json\n" + '{"id": "half', encoding="utf-8")
    table = predictions_table(path, limit=10)
    assert [r["id"] for r in table] == ["s4", "s3", "s2", "s1", "s0"]  # the torn last line is left out
    by_id = {r["id"]: r for r in table}
    assert by_id["s0"]["exact_match"] == 100.0 and by_id["s1"]["exact_match"] == 0.0
    assert by_id["s0"]["choice.correct"] is True and by_id["s1"]["choice.correct"] is False
    assert {"bleu-4", "rouge-l", "predict", "label"} <= set(by_id["s2"])
    assert predictions_table(path, limit=2, offset=4) == [by_id["s0"]]
    assert predictions_table(tmp_path / "absent.jsonl") == []
