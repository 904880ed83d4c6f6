"""`tunesmith train` end to end: a LLaMA-Factory example config unchanged, and the loss watchdog's exit."""

from __future__ import annotations

import json
import re

from tests.training.helpers import logged_losses, run_config
from tunesmith.cli import main

# examples/train_lora/llama3_lora_sft.yaml of LLaMA-Factory, with the model, data folder and sizes made
# tiny for a CPU (keys, sections and comments as they write them).
LLAMAFACTORY_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
dataset_dir: {data}
template: qwen
cutoff_len: 128
max_samples: 12
overwrite_cache: true
preprocessing_num_workers: 2
dataloader_num_workers: 0

### output
output_dir: {out}
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.2
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 2
"""


def test_llamafactory_sft_yaml_runs_unchanged(tiny_model_dir, lf_data, tmp_path):
    out = tmp_path / "saves"
    config = tmp_path / "llama3_lora_sft.yaml"
    config.write_text(LLAMAFACTORY_SFT.format(model=tiny_model_dir, data=lf_data, out=out), encoding="utf-8")

    assert main(["train", str(config), "max_steps=3"]) == 0

    assert [step for step, _ in logged_losses(out)] == [1, 2, 3]
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any(r.get("eval_loss") is not None for r in records)  # eval_steps: 2
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and len(adapter["target_modules"]) == 7  # lora_target: all -> every linear
    metrics = json.loads((out / "all_results.json").read_text())
    assert "eval_loss" in metrics


def test_watchdog_stops_a_diverging_run(tiny_model_dir, sft_data, tmp_path, capfd):
    out = tmp_path / "out"
    # AdamW moves every weight by about the learning rate: at 1e20 the squares in RMSNorm overflow and the
    # loss of step 2 is NaN (at 1e6 the norms keep the saturated model's loss finite).
    cfg = run_config(tiny_model_dir, sft_data, out, finetuning_type="full", learning_rate=1e20, max_steps=8)
    # (save_strategy=no would parse as YAML's boolean false: left at its default, nothing is saved in 8 steps)
    overrides = [f"{key}={value}" for key, value in cfg.items() if key != "save_strategy"]

    code = main(["train", *overrides])

    err = capfd.readouterr().err
    assert code != 0
    assert re.search(r"stopped by the loss watchdog at step \d+: loss is (nan|inf|-inf)", err), err[-2000:]
    assert err.count("is saved to") == 1  # the diagnosis is said once: by the CLI, not the log too
    assert "Traceback" not in err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert list(out.glob("watchdog_batch_step*.pt"))  # the batch of the bad step, to reproduce it


def test_templates_lists_stop_words_and_the_trained_stop_token(capsys):
    assert main(["templates"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "stop=['<|im_end|>'" in lines["qwen"] and "train_eos" not in lines["qwen"]
    assert "train_eos='{eos_token}'" in lines["glm4"]


def test_version_lists_the_stack_and_the_optional_kernel_packages(capsys):
    from importlib.metadata import version

    assert main(["version"]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["torch"] == version("torch") and lines["peft"] == version("peft")
    for optional in ("flash-attn-4", "liger-kernel", "triton"):  # which kernels a run may pick
        assert optional in lines
    assert "(not installed)" in lines["deepspeed"] or lines["deepspeed"] == version("deepspeed")
