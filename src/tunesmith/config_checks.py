"""Cross-field rules of a config: derived defaults, conflicts (errors) and keys with no effect (warnings).

All functions are pure: they take the flat mapping of our typed keys (``values``, defaults filled in),
the TrainingArguments kwargs (``hf``) and the set of keys the user wrote (``explicit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunesmith.errors import Problem

DEFAULT_DATA_CACHE = "~/.cache/tunesmith"

LORA_KEYS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "additional_target",
    "use_dora",
    "use_rslora",
    "pissa_init",
    "pissa_iter",
    "loraplus_lr_ratio",
)
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
PREF_KEYS = (
    "pref_beta",
    "pref_ftx",
    "pref_loss",
    "dpo_label_smoothing",
    "simpo_gamma",
    "ref_model",
    "ref_model_adapters",
)
KTO_KEYS = ("kto_chosen_weight", "kto_rejected_weight")
REWARD_KEYS = ("reward_model", "reward_model_adapters")

# (keys, the key that decides whether they apply, the values of it under which they do).
_APPLIES_ONLY = (
    (LORA_KEYS, "finetuning_type", ("lora",)),
    (FREEZE_KEYS, "finetuning_type", ("freeze",)),
    (PREF_KEYS, "stage", ("dpo", "kto")),
    (KTO_KEYS, "stage", ("kto",)),
    (REWARD_KEYS, "stage", ("ppo",)),
)


def resolve_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the defaults that depend on other keys (lora_alpha, packing, data_cache_dir)."""
    out = dict(values)
    if out["lora_alpha"] is None:
        out["lora_alpha"] = 2 * out["lora_rank"]
    if out["packing"] is None:
        out["packing"] = out["stage"] == "pt" or out["neat_packing"]
    out["data_cache_dir"] = str(Path(out["data_cache_dir"] or DEFAULT_DATA_CACHE).expanduser())
    return out


# Keys of commands that are not in this version yet: accepted so LLaMA-Factory configs load, but said aloud.
LATER_COMMAND_KEYS = {
    "tunesmith chat/predict/api": ("do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length",
                                   "max_new_tokens", "repetition_penalty", "length_penalty", "skip_special_tokens",
                                   "infer_backend", "infer_dtype", "vllm_maxlen", "vllm_gpu_util",
                                   "vllm_enforce_eager", "vllm_max_lora_rank", "api_host", "api_port", "api_key"),
    "tunesmith export": ("export_dir", "export_size", "export_device", "export_legacy_format", "export_hub_model_id"),
    "tunesmith eval": ("task", "task_dir", "batch_size", "n_shot", "lang", "save_dir"),
}  # fmt: skip


def unused_key_warnings(values: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """Keys the user set that have no effect with the chosen finetuning_type or stage, or in this version."""
    warnings = []
    for command, keys in LATER_COMMAND_KEYS.items():
        later = [key for key in keys if key in explicit]
        if later:
            warnings.append(
                f"{', '.join(later)} are for {command}, which this version does not have yet; "
                f"they have no effect"
            )
    for keys, decider, applies_when in _APPLIES_ONLY:
        unused = [key for key in keys if key in explicit]
        if unused and values[decider] not in applies_when:
            warnings.append(
                f"{', '.join(unused)} only apply when {decider} is {' or '.join(applies_when)} "
                f"(it is {values[decider]}); they have no effect"
            )
    return warnings


def cross_field_problems(
    values: Mapping[str, Any], hf: Mapping[str, Any], explicit: set[str], origins: Mapping[str, str]
) -> list[Problem]:
    """Every conflict between keys; each problem names the key to change and how."""
    v = values
    problems: list[Problem] = []

    def add(key: str, message: str, fix: str, allowed: str = "") -> None:
        at = f"({origins[key]}) " if origins.get(key) else ""
        value = v[key] if key in v else hf.get(key)
        problems.append(Problem(key, at + message, value=value, allowed=allowed, fix=fix))

    training = v["do_train"]
    if training and not v["dataset"]:
        add(
            "dataset",
            f"stage {v['stage']} with do_train: true needs training data",
            "set dataset: names from <dataset_dir>/dataset_info.json or file paths (comma list)",
        )
    if training and not v["model_name_or_path"]:
        add(
            "model_name_or_path",
            "training needs a model",
            "set model_name_or_path: a hub id or a local folder",
        )
    if training and not v["output_dir"]:
        add("output_dir", "training needs an output folder", "set output_dir: e.g. saves/my-run")
    if v["stage"] == "ppo" and training and not v["reward_model"]:
        add(
            "reward_model",
            "stage ppo needs a reward model",
            "set reward_model: a path to a trained reward model",
        )

    if v["val_size"] and v["eval_dataset"]:
        add(
            "val_size",
            "val_size and eval_dataset are both set",
            "keep one: val_size splits off part of dataset, eval_dataset names separate data",
        )
    if v["val_size"] >= 1 and not float(v["val_size"]).is_integer():
        add(
            "val_size",
            "a val_size of 1 or more is a sample count and must be whole",
            "write a share below 1 (e.g. 0.1) or a whole count (e.g. 500)",
        )
    if v["quantization_bit"] is not None:
        if v["quantization_bit"] not in (4, 8):
            add("quantization_bit", "unsupported bit width", "use 4 or 8, or remove the key", allowed="4, 8")
        if v["finetuning_type"] != "lora":
            add(
                "quantization_bit",
                f"a quantized model can only be trained with LoRA, not {v['finetuning_type']}",
                "set finetuning_type: lora, or remove quantization_bit",
            )
    if v["adapter_name_or_path"] and v["finetuning_type"] != "lora":
        add(
            "adapter_name_or_path",
            f"adapters need finetuning_type: lora (it is {v['finetuning_type']})",
            "set finetuning_type: lora, or remove adapter_name_or_path",
        )
    if v["freeze_trainable_layers"] == 0:
        add(
            "freeze_trainable_layers",
            "0 layers would train nothing",
            "use n > 0 for the last n layers or n < 0 for the first n",
        )
    if v["neat_packing"] and "packing" in explicit and not v["packing"]:
        add(
            "packing", "neat_packing: true needs packing", "remove packing: false, or set neat_packing: false"
        )

    probs = v["interleave_probs"]
    if probs and v["mix_strategy"] == "concat":
        add(
            "interleave_probs",
            "interleave_probs only apply when mixing by interleaving",
            "set mix_strategy: interleave_under (or interleave_over), or remove interleave_probs",
        )
    elif probs and len(probs) != len(v["dataset"]):
        add(
            "interleave_probs",
            f"{len(probs)} probabilities for {len(v['dataset'])} datasets",
            "give one probability per entry of dataset, in the same order",
        )
    elif probs and (any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6):
        add("interleave_probs", "probabilities must be >= 0 and sum to 1", "e.g. interleave_probs: 0.7,0.3")

    eval_strategy = hf.get("eval_strategy", "no")
    if training and eval_strategy != "no" and not v["val_size"] and not v["eval_dataset"]:
        add(
            "eval_strategy",
            f"eval_strategy: {eval_strategy} needs evaluation data",
            "set val_size (e.g. 0.1) or eval_dataset, or set eval_strategy: no",
        )
    if hf.get("bf16") and hf.get("fp16"):
        add("bf16", "bf16 and fp16 are both true", "keep one of them (bf16 where the GPU supports it)")
    return problems
