"""Model tier: pt and sft x full, freeze, lora, dora through the public API on the tiny model (CPU).

Each run must lower the loss, change exactly the trainable weights, and leave an output folder that plain
transformers / peft load and generate from, with our chat template, stop ids and run records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.helpers import load_safetensors, logged_losses, train

METHODS = {
    "full": {"finetuning_type": "full", "learning_rate": 5e-3},
    # the last of the two layers and the head; embeddings, layer 0 and the final norm stay frozen
    "freeze": {
        "finetuning_type": "freeze",
        "freeze_trainable_layers": 1,
        "freeze_extra_modules": ["lm_head"],
        "learning_rate": 5e-3,
    },
    "lora": {"finetuning_type": "lora", "learning_rate": 1e-2},
    "dora": {"finetuning_type": "lora", "use_dora": True, "learning_rate": 1e-2},
}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name the capital city number 1."},
    {"role": "assistant", "content": "The capital is Rome."},
    {"role": "user", "content": "And number 2?"},
]


def _check_weights(method: str, out: Path, base: dict[str, torch.Tensor]) -> None:
    """Trainable weights changed, frozen ones are bit-identical to the base (or absent from an adapter)."""
    if method in ("full", "freeze"):
        saved = load_safetensors(out / "model.safetensors")
        assert saved.keys() == base.keys()
        for name, tensor in saved.items():
            trainable = method == "full" or ".layers.1." in name or name.startswith("lm_head.")
            assert torch.equal(tensor, base[name]) != trainable, f"{name}: trainable={trainable}"
        return
    adapter = load_safetensors(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter), sorted(adapter)
    b_weights = [t for name, t in adapter.items() if "lora_B" in name]
    assert b_weights and all(bool(t.abs().sum() > 0) for t in b_weights)  # lora_B starts at zero
    magnitudes = {n: t for n, t in adapter.items() if "lora_magnitude_vector" in n}
    assert bool(magnitudes) == (method == "dora")
    for name, magnitude in magnitudes.items():
        # DoRA starts each magnitude at the row norms of the base weight.
        base_name = name.removeprefix("base_model.model.").replace(".lora_magnitude_vector", "")
        base_name = base_name.removesuffix(".weight") + ".weight"
        start = base[base_name].norm(dim=1)
        assert not torch.allclose(magnitude, start), name


def _load_and_generate(method: str, out: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    loader = AutoModelForCausalLM if method in ("full", "freeze") else AutoPeftModelForCausalLM
    model = loader.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def _check_outputs(out: Path, plot: bool) -> None:
    from transformers import AutoTokenizer

    from tunesmith.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = resolve_template("qwen", tokenizer)
    for gen_prompt in (False, True):
        ours = template.render(MESSAGES[:3] if not gen_prompt else MESSAGES, add_generation_prompt=gen_prompt)
        theirs = tokenizer.apply_chat_template(
            MESSAGES[:3] if not gen_prompt else MESSAGES, tokenize=False, add_generation_prompt=gen_prompt
        )
        assert theirs == ours.text
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    stops = [tokenizer.convert_tokens_to_ids(word) for word in template.stop_words]
    assert stops and set(stops) <= set(eos)
    assert (out / "tunesmith_config.yaml").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "trainer_log.jsonl").is_file()
    assert (out / "training_loss.png").is_file() == plot


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_stage_method_trains_and_saves(stage, method, tiny_model_dir, sft_data, pt_data, tmp_path):
    out = tmp_path / "out"
    plot = method == "lora"  # drawing and evaluating cost time: once per stage is enough
    extra = {"plot_loss": True, "val_size": 4} if plot else {}
    train(
        tiny_model_dir, pt_data if stage == "pt" else sft_data, out, stage=stage, **extra, **METHODS[method]
    )

    losses = [loss for _, loss in logged_losses(out)]
    assert len(losses) == 12
    assert all(torch.isfinite(torch.tensor(losses)))
    # LoRA cannot go far: the tiny model's frozen head has small random weights, which bound the logits.
    assert losses[-1] < losses[0] - 0.5, losses
    _check_weights(method, out, load_safetensors(tiny_model_dir / "model.safetensors"))
    _check_outputs(out, plot)
    _load_and_generate(method, out)
    if plot:
        metrics = json.loads((out / "all_results.json").read_text())
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


NEW_TOKENS = ["<|tool_x|>", "<|tool_y|>"]
TRAINED_KEYS = {
    "model.embed_tokens": "base_model.model.model.embed_tokens.weight",
    "lm_head": "base_model.model.lm_head.weight",
}


@pytest.fixture(scope="module")
def new_tokens_run(tiny_model_dir, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("new_tokens") / "out"
    train(tiny_model_dir, sft_data, out, finetuning_type="lora", new_special_tokens=NEW_TOKENS, max_steps=2)
    return out


def _generates(model, tokenizer) -> bool:
    prompt = tokenizer(f"hello {NEW_TOKENS[0]}", return_tensors="pt")
    return model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]


def test_new_special_tokens_saved_with_lora_adapter(new_tokens_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(new_tokens_run)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS]
    assert all(i >= 2048 for i in ids)  # beyond the base vocabulary
    assert tokenizer.encode(f"a {NEW_TOKENS[0]} b", add_special_tokens=False).count(ids[0]) == 1
    adapter = load_safetensors(new_tokens_run / "adapter_model.safetensors")
    # peft's key for a trained module (it also saves the module's frozen original: "original_module")
    trained = {m: adapter[key] for m, key in TRAINED_KEYS.items()}
    assert all(t.shape[0] > max(ids) for t in trained.values())
    base = load_safetensors(tiny_model_dir / "model.safetensors")
    for module, tensor in trained.items():
        assert not torch.equal(tensor[:2048], base[f"{module}.weight"]), module  # trained, not just copied

    # Plain peft, on a base resized the way tunesmith resized it (to exactly len(tokenizer)).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, new_tokens_run)
    assert torch.equal(model.get_input_embeddings().weight, trained["model.embed_tokens"])
    assert torch.equal(model.get_output_embeddings().weight, trained["lm_head"])
    assert _generates(model, tokenizer)


def test_new_special_tokens_adapter_loads_with_auto_peft(new_tokens_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(new_tokens_run)
    assert _generates(AutoPeftModelForCausalLM.from_pretrained(new_tokens_run), tokenizer)
