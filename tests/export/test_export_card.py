"""The model card: a pure rendering of CardData, and the training summary read from a run's files."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.export.card import CardData, render_card, training_summary


def _run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {
        "stage": "sft", "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": ["all"],
        "use_dora": False, "freeze_trainable_layers": 2, "learning_rate": 1e-4, "dataset": ["alpaca_en_demo"],
        "eval_dataset": [], "val_size": 0.1, "max_samples": None, "template": "qwen",
    }  # fmt: skip
    manifest = {"status": "completed", "config": config, "final_metrics": {"train_loss": 1.5}}
    (folder / "run.json").write_text(json.dumps(manifest))
    state = {
        "global_step": 120,
        "epoch": 3.0,
        "log_history": [{"loss": 2.0}, {"eval_loss": 1.25, "step": 120}],
    }
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "all_results.json").write_text(json.dumps({"train_loss": 1.4567, "epoch": 3.0}))
    return folder


def test_training_summary_reads_method_data_steps_and_metrics(tmp_path: Path) -> None:
    s = training_summary(_run_folder(tmp_path))
    assert s["status"] == "completed" and s["global_step"] == 120 and s["epoch"] == 3.0
    assert s["method"] == {
        "stage": "sft", "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_target": ["all"],
        "learning_rate": 1e-4, "template": "qwen",
    }  # fmt: skip
    assert s["data"] == {"dataset": ["alpaca_en_demo"], "val_size": 0.1}
    assert s["metrics"] == {"train_loss": 1.4567, "epoch": 3.0, "eval_loss": 1.25}
    assert training_summary(tmp_path / "nothing-here") is None


def test_card_names_everything_a_user_needs(tmp_path: Path) -> None:
    data = CardData(
        name="capitals-7b",
        base_model="Qwen/Qwen2.5-7B-Instruct",
        dtype="bfloat16",
        template="qwen",
        stop_tokens=["<|im_end|>", "<|endoftext|>"],
        adapters=[{"path": "saves/lora", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}],
        training=[training_summary(_run_folder(tmp_path))],
        checks=["logits vs base + adapter: PASS, max |diff| 0.01", "stop test: 8/8 greedy answers ended"],
    )
    card = render_card(data)
    assert card.startswith("---\nbase_model: Qwen/Qwen2.5-7B-Instruct\n")
    for needle in (
        "# capitals-7b",
        "1 LoRA adapter(s) merged (bfloat16)",
        "Adapter `saves/lora`: LoRA r=16, alpha=32, targets: q_proj, v_proj",
        "Chat template: `qwen`",
        "Stop tokens: `<|im_end|>`, `<|endoftext|>`",
        "- Data: dataset: alpaca_en_demo; val_size: 0.1",
        "- Method: stage=sft, finetuning_type=lora, lora_rank=16, lora_alpha=32, lora_target=all",
        "- Steps: 120 (3 epochs)",
        "eval_loss=1.25",
        "train_loss=1.457",
        "- logits vs base + adapter: PASS",
        "- stop test: 8/8",
        "tunesmith chat model_name_or_path=. template=qwen",
        "tunesmith api model_name_or_path=. template=qwen",
        "vllm serve .\n",
        "ollama create capitals-7b -f Modelfile",
    ):
        assert needle in card, needle
    assert "freeze_trainable_layers" not in card and "use_dora" not in card


def test_card_of_a_quantized_export_without_records_or_checks() -> None:
    card = render_card(
        CardData(
            name="m", base_model="b", dtype="float16", template="auto", stop_tokens=[], quantization_bit=4
        )
    )
    assert "float16, 4-bit bitsandbytes" in card and "vllm serve . --quantization bitsandbytes" in card
    assert "No training record" in card and "not run (export_check: false)" in card
    assert "LoRA" not in card and "- lora" not in card
