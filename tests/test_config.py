"""The strict config loader: LLaMA-Factory YAML compatibility, overrides, errors, round trip."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tunesmith.config import (
    RESOLVED_CONFIG_NAME,
    load_config,
    parse_override_value,
    read_environment,
    write_resolved_config,
)
from tunesmith.config_schema import GROUPS, PROMOTED_HF_FIELDS, Config
from tunesmith.config_types import hf_training_fields
from tunesmith.errors import ConfigError

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, comments and all.
LLAMAFACTORY_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in excinfo.value.problems:
        out.setdefault(p.key, []).append(p.render())
    return out


@pytest.fixture
def sft_yaml(tmp_path: Path) -> Path:
    return write(tmp_path, LLAMAFACTORY_SFT, "llama3_lora_sft.yaml")


def test_llamafactory_sft_yaml_loads_unchanged(sft_yaml: Path) -> None:
    cfg = load_config(sft_yaml, environ=NO_ENV)
    assert cfg.source == str(sft_yaml)
    assert cfg.model.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.model.trust_remote_code is True and cfg.model.template == "llama3"
    assert cfg.data.dataset == ("identity", "alpaca_en_demo")
    assert (cfg.data.cutoff_len, cfg.data.max_samples, cfg.data.val_size) == (2048, 1000, 0.1)
    assert cfg.data.preprocessing_num_workers == 16 and cfg.data.overwrite_cache is True
    assert cfg.finetuning.stage == "sft" and cfg.finetuning.finetuning_type == "lora"
    assert cfg.finetuning.lora_rank == 8 and cfg.finetuning.lora_alpha == 16  # default 2 * rank
    assert cfg.finetuning.lora_target == ("all",)
    t = cfg.training
    assert t.do_train and t.output_dir == "saves/llama3-8b/lora/sft" and t.resume_from_checkpoint is None
    assert t.overwrite_output_dir and t.plot_loss
    assert t.hf["learning_rate"] == pytest.approx(1e-4) and isinstance(t.hf["learning_rate"], float)
    assert t.hf["lr_scheduler_type"] == "cosine" and t.hf["report_to"] == "none"
    assert t.hf["bf16"] is True and t.hf["ddp_timeout"] == 180000000
    assert t.hf["eval_strategy"] == "steps" and t.hf["dataloader_num_workers"] == 4
    # transformers 5 folded warmup_ratio into warmup_steps (a value below 1 is a ratio).
    assert "warmup_ratio" not in t.hf and t.hf["warmup_steps"] == pytest.approx(0.1)
    assert cfg.warnings == ()


def test_hf_kwargs_build_real_training_arguments(sft_yaml: Path, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    # bf16 needs a GPU in TrainingArguments' own check; everything else is the file as written.
    cfg = load_config(sft_yaml, {"bf16": False, "output_dir": str(tmp_path / "out")}, environ=NO_ENV)
    args = TrainingArguments(**cfg.training.hf_kwargs())
    assert args.learning_rate == pytest.approx(1e-4) and args.gradient_accumulation_steps == 8
    assert args.lr_scheduler_type.value == "cosine" and args.do_train and args.seed == 42
    assert args.get_warmup_steps(1000) == 100


def test_json_config_loads(tmp_path: Path) -> None:
    path = write(tmp_path, '{"model_name_or_path": "m", "lora_rank": 4, "dataset": ["a", "b"]}', "c.json")
    cfg = load_config(path, environ=NO_ENV)
    assert cfg.finetuning.lora_rank == 4 and cfg.data.dataset == ("a", "b")


def test_typo_key_names_file_and_suggestions(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name_or_path: m\nlora_rnak: 8\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    text = str(excinfo.value)
    assert str(path) in text
    by_key = problems_of(excinfo)
    assert "lora_rank" in by_key["lora_rnak"][0] and "(line 2) unknown key" in by_key["lora_rnak"][0]
    assert "learning_rate" in by_key["learning_rat"][0] and "line 3" in by_key["learning_rat"][0]


def test_known_but_unsupported_keys_say_so(tmp_path: Path) -> None:
    path = write(tmp_path, "use_unsloth: true\nevaluation_strategy: steps\nlogging_dir: logs\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    by_key = problems_of(excinfo)
    assert "not supported by tunesmith yet" in by_key["use_unsloth"][0]
    assert "unknown" not in by_key["use_unsloth"][0]
    assert "eval_strategy" in by_key["evaluation_strategy"][0]
    assert "TENSORBOARD_LOGGING_DIR" in by_key["logging_dir"][0]


def test_many_problems_reported_at_once(tmp_path: Path) -> None:
    text = """\
model_name_or_path: m
stage: sft
do_train: true
output_dir: out
lora_rank: abc
mix_strategy: concatenate
cutoff_len: 0
val_size: 0.1
eval_dataset: held_out
quantization_bit: 3
lr_scheduler_type: cosin
bf16: maybe
template: yes
"""
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text), environ=NO_ENV)
    by_key = problems_of(excinfo)
    assert set(by_key) == {
        "lora_rank", "mix_strategy", "cutoff_len", "val_size", "quantization_bit", "lr_scheduler_type",
        "bf16", "template", "dataset",
    }  # fmt: skip
    assert "wrong type" in by_key["lora_rank"][0] and "'abc'" in by_key["lora_rank"][0]
    assert "e.g. lora_rank: 8" in by_key["lora_rank"][0]
    assert "did you mean concat?" in by_key["mix_strategy"][0]
    assert "interleave_under" in by_key["mix_strategy"][0]  # the allowed values are listed
    assert "did you mean cosine?" in by_key["lr_scheduler_type"][0]
    assert ">= 1" in by_key["cutoff_len"][0]
    assert "eval_dataset" in by_key["val_size"][0]
    assert "4, 8" in by_key["quantization_bit"][0]
    assert "quote text" in by_key["template"][0]  # YAML reads `yes` as a bool
    assert "needs training data" in by_key["dataset"][0]
    for problem in excinfo.value.problems:
        assert problem.fix, problem


def test_lora_keys_with_full_finetuning_warn_only(tmp_path: Path) -> None:
    path = write(tmp_path, "finetuning_type: full\nlora_rank: 16\nlora_target: q_proj,v_proj\n")
    cfg = load_config(path, environ=NO_ENV)
    assert len(cfg.warnings) == 1
    assert "lora_rank, lora_target" in cfg.warnings[0] and "full" in cfg.warnings[0]
    assert cfg.finetuning.lora_target == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        (["stage=sft", "do_train=true", "model_name_or_path=m", "output_dir=o"], "dataset", "needs training"),
        (["finetuning_type=full", "quantization_bit=4"], "quantization_bit", "only be trained with LoRA"),
        (["dataset=a,b", "mix_strategy=interleave_under", "interleave_probs=0.5"], "interleave_probs", "1 prob"),
        (["dataset=a,b", "mix_strategy=interleave_over", "interleave_probs=0.5,0.6"], "interleave_probs", "sum to 1"),
        (["dataset=a", "interleave_probs=1.0"], "interleave_probs", "interleave_under"),
        (["do_train=true", "dataset=a", "model_name_or_path=m", "output_dir=o", "eval_strategy=steps"],
         "eval_strategy", "needs evaluation data"),
        (["do_train=true", "dataset=a", "model_name_or_path=m", "output_dir=o", "streaming=true"],
         "streaming", "not supported by tunesmith yet"),
        (["do_train=true", "dataset=a", "model_name_or_path=m"], "output_dir", "output folder"),
        (["val_size=2.5"], "val_size", "must be whole"),
        (["neat_packing=true", "packing=false"], "packing", "neat_packing"),
        (["finetuning_type=freeze", "adapter_name_or_path=a"], "adapter_name_or_path", "lora"),
        (["bf16=true", "fp16=true"], "bf16", "both true"),
        (["warmup_ratio=0.1", "warmup_steps=10"], "warmup_ratio", "both set"),
        (["max_bad_row_share=1.5"], "max_bad_row_share", "<= 1"),
        (["log_level=loud"], "log_level", "passive"),
    ],
)  # fmt: skip
def test_cross_field_and_range_problems(overrides: list[str], key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides, environ=NO_ENV)
    by_key = problems_of(excinfo)
    assert key in by_key, str(excinfo.value)
    assert any(needle in text for text in by_key[key]), by_key[key]
    if any(item.startswith(f"{key}=") for item in overrides):
        assert "(override)" in by_key[key][0]


def test_overrides_win_and_parse_yaml_style(sft_yaml: Path) -> None:
    cfg = load_config(
        sft_yaml,
        ["lora_rank=16", "bf16=false", "dataset=alpaca_en_demo", "learning_rate=1e-5",
         "default_system=You are: precise", "lora_target=[q_proj, v_proj]", "max_samples="],
        environ=NO_ENV,
    )  # fmt: skip
    assert cfg.finetuning.lora_rank == 16 and cfg.finetuning.lora_alpha == 32
    assert cfg.training.hf["bf16"] is False
    assert cfg.data.dataset == ("alpaca_en_demo",)
    assert cfg.training.hf["learning_rate"] == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a str
    assert cfg.data.default_system == "You are: precise"
    assert cfg.finetuning.lora_target == ("q_proj", "v_proj")
    assert cfg.data.max_samples is None
    assert load_config(sft_yaml, ["eval_dataset="], environ=NO_ENV).data.eval_dataset == ()
    assert load_config(sft_yaml, {"lora_rank": 4}, environ=NO_ENV).finetuning.lora_rank == 4


def test_parse_override_value() -> None:
    assert parse_override_value("8") == 8
    assert parse_override_value("true") is True
    assert parse_override_value("a,b") == "a,b"
    assert parse_override_value("") is None
    assert parse_override_value("[1, 2]") == [1, 2]
    assert parse_override_value("{a: 1}") == {"a": 1}
    assert parse_override_value("x: y") == "x: y"
    assert parse_override_value("'quoted'") == "quoted"


def test_malformed_overrides_fail() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["lora_rank", "=3"], environ=NO_ENV)
    assert len(excinfo.value.problems) == 2
    assert all("key=value" in p.render() for p in excinfo.value.problems)


def test_resolved_config_round_trips(sft_yaml: Path, tmp_path: Path) -> None:
    env = {"TUNESMITH_CACHE": str(tmp_path / "cache"), "API_KEY": "secret-token"}
    cfg = load_config(sft_yaml, ["finetuning_type=full", "lora_rank=4"], environ=env)
    path = write_resolved_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / RESOLVED_CONFIG_NAME
    text = path.read_text(encoding="utf-8")
    assert "secret-token" not in text and "api_key" not in yaml.safe_load(text)
    flat = yaml.safe_load(text)
    assert flat["warmup_steps"] == pytest.approx(0.1) and flat["dataset"] == ["identity", "alpaca_en_demo"]
    again = load_config(path, environ=env)
    assert again == cfg
    assert again.to_flat_dict() == cfg.to_flat_dict()
    assert again.infer.api_key == "secret-token"  # from the environment again, never from the file


def test_flat_dict_has_every_key_once() -> None:
    cfg = load_config(None, {"learning_rate": 2e-5}, environ=NO_ENV)
    flat = cfg.to_flat_dict()
    own = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls) if f.name != "hf"]
    assert len(own) == len(set(own)), "a key is defined in two groups"
    assert list(flat) == [*own, "learning_rate"]
    assert isinstance(flat["dataset"], list)


def test_schema_fields_are_documented_and_do_not_shadow_training_arguments() -> None:
    hf = hf_training_fields()
    for cls in [*GROUPS.values(), Config]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is Config:
                continue
            doc = f.metadata.get("help", "")
            assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} needs a one-line help"
            assert f.name in hints
            if f.name in hf:
                assert f.name in PROMOTED_HF_FIELDS, f"{f.name} would hide a TrainingArguments field"


def test_environment_gives_defaults_file_and_overrides_win(tmp_path: Path) -> None:
    env = {"TUNESMITH_CACHE": "~/tscache", "API_PORT": "9001", "API_HOST": "0.0.0.0", "UNRELATED": "x"}
    assert read_environment(env) == {
        "TUNESMITH_CACHE": "~/tscache",
        "API_PORT": "9001",
        "API_HOST": "0.0.0.0",
    }
    cfg = load_config(None, None, environ=env)
    assert cfg.data.data_cache_dir == str(Path("~/tscache").expanduser())
    assert cfg.infer.api_port == 9001 and cfg.infer.api_host == "0.0.0.0"
    path = write(tmp_path, "api_port: 7000\n")
    assert load_config(path, environ=env).infer.api_port == 7000
    assert load_config(path, ["api_port=7100"], environ=env).infer.api_port == 7100
    default = load_config(None, environ=NO_ENV)
    assert default.data.data_cache_dir == str(Path("~/.cache/tunesmith").expanduser())
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, environ={"API_PORT": "eighty"})
    assert "environment variable API_PORT" in str(excinfo.value)


def test_bad_yaml_syntax_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name_or_path: m\nlora_rank: 8\n  bad_indent: [1, 2\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    text = str(excinfo.value)
    assert str(path) in text and "line 3" in text and "invalid YAML" in text


def test_bad_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "lora_rank": 8,\n}\n', "c.json")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    assert "line 3" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_duplicate_key_fails_with_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "lora_rank: 8\ncutoff_len: 512\nlora_rank: 16\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.key == "lora_rank" and "line 3" in problem.message and "line 1" in problem.message


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.yaml", None, "not found"),
        ("list.yaml", "- a\n- b\n", "must be a mapping"),
        ("cfg.toml", "a = 1\n", "unsupported config file type"),
        ("keys.yaml", "1: x\n", "keys must be strings"),
    ],
)
def test_file_level_errors(tmp_path: Path, name: str, content: str | None, needle: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, environ=NO_ENV)
    assert needle in str(excinfo.value) and str(path) in str(excinfo.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "# nothing yet\n"), environ=NO_ENV)
    assert cfg == load_config(None, environ=NO_ENV)
    assert cfg.finetuning.stage == "sft" and cfg.data.packing is False
    assert load_config(None, ["stage=pt"], environ=NO_ENV).data.packing is True


def test_config_is_frozen() -> None:
    cfg = load_config(None, environ=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.finetuning.lora_rank = 4  # type: ignore[misc]


def test_import_has_no_side_effects() -> None:
    code = "import sys, tunesmith.config; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
