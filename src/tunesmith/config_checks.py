"""Cross-field rules of a config: derived defaults, conflicts (errors) and keys with no effect (warnings).

All functions are pure: they take the flat mapping of our typed keys (``values``, defaults filled in),
the TrainingArguments kwargs (``hf``) and the set of keys the user wrote (``explicit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
)
REF_KEYS = ("ref_model", "ref_model_adapters")
KTO_KEYS = ("kto_chosen_weight", "kto_rejected_weight")
REWARD_KEYS = ("reward_model", "reward_model_adapters")
RL_KEYS = ("reward_funcs", "reward_weights", "answer_column", "reward_format_pattern", "reward_length_target")
GRPO_KEYS = ("num_generations", "grpo_beta", "grpo_epsilon", "grpo_iterations")
PPO_KEYS = ("ppo_epochs", "ppo_score_norm", "ppo_whiten_rewards", "ppo_kl_coef", "ppo_target")

# (keys, the key that decides whether they apply, the values of it under which they do).
_APPLIES_ONLY = (
    (LORA_KEYS, "finetuning_type", ("lora",)),
    (FREEZE_KEYS, "finetuning_type", ("freeze",)),
    (PREF_KEYS, "stage", ("dpo", "kto")),
    (REF_KEYS, "stage", ("dpo", "kto", "ppo", "grpo")),
    (KTO_KEYS, "stage", ("kto",)),
    (REWARD_KEYS, "stage", ("ppo",)),
    (RL_KEYS, "stage", ("ppo", "grpo")),
    (GRPO_KEYS, "stage", ("grpo",)),
    (PPO_KEYS, "stage", ("ppo",)),
)


CUDA_GRAPH_WHY = (
    "records CUDA graphs, and tunesmith compiles each decoder layer on its own: a step runs every layer's "
    "recorded forward before any backward, which CUDA graph trees do not support (the run crashed with a "
    "segfault on an H200, torch 2.11)"
)


def resolve_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the defaults that depend on other keys (lora_alpha, packing, data_cache_dir, checkpointing)."""
    out = dict(values)
    if out["lora_alpha"] is None:
        out["lora_alpha"] = 2 * out["lora_rank"]
    if out["packing"] is None:
        out["packing"] = out["stage"] == "pt" or out["neat_packing"]
    if out["offload_activations"] and out["disable_gradient_checkpointing"] is None:
        out["disable_gradient_checkpointing"] = False  # offloading moves what checkpointing keeps
    out["data_cache_dir"] = str(Path(out["data_cache_dir"] or DEFAULT_DATA_CACHE).expanduser())
    return out


def unused_key_warnings(values: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """Keys the user set that have no effect with the chosen finetuning_type or stage, or in this version."""
    warnings = []
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
    if hf.get("neftune_noise_alpha") and v["flash_attn"] == "varlen" and v["stage"] in ("pt", "sft"):
        add(
            "flash_attn",
            "flash_attn: varlen lays a batch's rows back to back in one row, and NEFTune scales its noise by "
            "1/sqrt(row length x hidden size): the noise would be about sqrt(rows) times weaker than asked",
            "use flash_attn: auto (sdpa when neftune_noise_alpha is set) or sdpa, or remove neftune_noise_alpha",
        )
    if v["varlen_kernel"] != "auto" and v["flash_attn"] not in ("auto", "varlen"):
        add(
            "varlen_kernel",
            f"varlen_kernel chooses the kernel of flash_attn: varlen, but flash_attn is {v['flash_attn']}",
            "remove varlen_kernel, or set flash_attn: varlen",
        )
    if hf.get("torch_compile"):
        _compile_problems(hf, add)
    if v["stage"] == "ppo" and training and not v["reward_model"] and not v["reward_funcs"]:
        add(
            "reward_model",
            "stage ppo needs a reward model or reward functions",
            "set reward_model: a path to a reward model trained with stage: rm, or reward_funcs: "
            "e.g. exact_match",
        )
    if v["stage"] == "ppo" and v["reward_model"] and v["reward_funcs"]:
        add(
            "reward_funcs",
            "stage ppo scores with reward_model or with reward_funcs, not both",
            "remove one of reward_model and reward_funcs",
        )
    if v["stage"] == "grpo" and training and not v["reward_funcs"]:
        add(
            "reward_funcs",
            "stage grpo needs reward functions",
            "set reward_funcs: built-ins exact_match, format, length or module:function (comma list)",
        )
    if v["reward_weights"] and len(v["reward_weights"]) != len(v["reward_funcs"]):
        add(
            "reward_weights",
            f"{len(v['reward_weights'])} weights for {len(v['reward_funcs'])} reward_funcs",
            "give one weight per reward function, in the same order",
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
    if v["export_quantization_bit"] not in (None, 4, 8):
        add(
            "export_quantization_bit",
            "unsupported bit width",
            "use 4 or 8, or remove the key",
            allowed="4, 8",
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
    if v["nnodes"] is not None and v["node_rank"] is not None and v["node_rank"] >= v["nnodes"]:
        add("node_rank", f"node_rank must be below nnodes ({v['nnodes']})", "number the nodes 0 to nnodes-1")
    if v["offload_activations"] and v["disable_gradient_checkpointing"]:
        add(
            "disable_gradient_checkpointing",
            "offload_activations moves the inputs that gradient checkpointing keeps for backward; with "
            "checkpointing off there are none to move",
            "remove disable_gradient_checkpointing (offload_activations turns checkpointing on), or remove "
            "offload_activations",
        )
    _engine_problems(v, hf, add)
    if v["cuda_graphs"]:
        ruled_out = [why for why in cuda_graph_obstacles(v, hf) if why != "cuda_graphs: false"]
        if ruled_out:
            add(
                "cuda_graphs",
                f"cuda_graphs: true, but this run's steps cannot be replayed as CUDA graphs: {'; '.join(ruled_out)}",
                "remove cuda_graphs (graphs wherever the step allows them, logged), or change what rules them out",
            )
    return problems


def cuda_graph_obstacles(v: Mapping[str, Any], hf: Mapping[str, Any]) -> list[str]:
    """What in a config rules out replaying its training steps as CUDA graphs (`training.step_graphs`);
    the trainer checks the rest (a GPU, one process, the fused head, checkpointing as decided) at its start."""
    optim = str(hf.get("optim", ""))
    found = {
        "cuda_graphs: false": v["cuda_graphs"] is False,
        # Llama-3.2-1B full SFT, packed, compiled, H200: 43,344 tokens/s with graphs against 55,159 without
        # (bench/results/train_throughput-2026-11-28T2308Z-llama-full-best-graphs-h200.json)
        "finetuning_type: full (measured slower with graphs: its large steps gain little from a replay, "
        "and packed batches bring new shapes; cuda_graphs: true turns them on)": v["cuda_graphs"] is None
        and v["finetuning_type"] == "full",
        # Llama-3.2-1B LoRA, packed, compiled, H200: 7 captures of new shapes inside steps 10-60 took 2.6 of
        # the window's 12.9 s, 56,209 tokens/s against 64,573 without graphs in an earlier call (the Qwen
        # pair: 68,288 against 77,676); bench/results/train_throughput-2026-11-29T0454Z-llama-lora-fa4-h200.json
        "packing (measured slower with graphs: packed batches are large, GPU-bound steps, and their "
        "document counts bring new shapes to capture; cuda_graphs: true turns them on)": v["cuda_graphs"]
        is None
        and bool(v["packing"]),
        f"stage {v['stage']} (graphs replay pt and sft steps)": v["stage"] not in ("pt", "sft"),
        f"flash_attn: {v['flash_attn']} (graphs need varlen's document boundaries)": v["flash_attn"]
        not in ("auto", "varlen"),
        "neftune_noise_alpha (it needs padded rows, not varlen)": bool(hf.get("neftune_noise_alpha")),
        "quantization_bit": v["quantization_bit"] is not None,
        "fp16 (its loss scaler reads the gradients on the host)": bool(hf.get("fp16")),
        "gradient checkpointing (disable_gradient_checkpointing: false or offload_activations)": v[
            "disable_gradient_checkpointing"
        ]
        is False
        or v["offload_activations"],
        "tiled_mlp_tokens (its backward reads the CUDA random state)": v["tiled_mlp_tokens"] is not None,
        "use_liger_kernel (its loss is not the fused head)": bool(hf.get("use_liger_kernel")),
        "label_smoothing_factor (the plain loss path)": bool(hf.get("label_smoothing_factor")),
        "DeepSpeed or FSDP": bool(hf.get("deepspeed") or hf.get("fsdp")),
        f"optim {optim} (it steps inside backward)": "lomo" in optim or "layerwise" in optim,
        "torch_empty_cache_steps": hf.get("torch_empty_cache_steps") is not None,
    }
    return [what for what, on in found.items() if on]


def _compile_problems(hf: Mapping[str, Any], add: Callable[..., None]) -> None:
    """torch_compile's mode and backend: CUDA graphs (a mode's, or the cudagraphs backend) cannot run over
    per-layer compiled training, and a mode torch does not know fails only at the first step."""
    from tunesmith.model.compile import compile_modes

    mode, backend = hf.get("torch_compile_mode"), hf.get("torch_compile_backend")
    if backend == "cudagraphs":
        add(
            "torch_compile_backend",
            f"torch_compile_backend: cudagraphs {CUDA_GRAPH_WHY}",
            "remove torch_compile_backend (inductor, the default)",
        )
    if mode is None:
        return
    modes = compile_modes(mode)
    usable = [m for m, graphs in modes.items() if not graphs]
    if mode not in modes:
        add(
            "torch_compile_mode",
            f"torch_compile_mode {mode!r} is not a mode of the installed torch",
            "use one of the allowed modes, or remove torch_compile_mode (default)",
            allowed=", ".join(usable),
        )
    elif modes[mode]:
        fix = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        add(
            "torch_compile_mode",
            f"torch_compile_mode: {mode} {CUDA_GRAPH_WHY}",
            f"use torch_compile_mode: {fix} (the same kernels without CUDA graphs), or remove torch_compile_mode",
        )


def _engine_problems(v: Mapping[str, Any], hf: Mapping[str, Any], add: Callable[..., None]) -> None:
    """deepspeed/fsdp values that cannot work, and engine combinations known to fail."""
    from tunesmith.training.distributed import (
        EngineSettingError,
        parse_fsdp,
        read_deepspeed,
        read_fsdp_config,
    )

    def read(key: str, reader: Callable[[Any], Any]) -> Any:
        if not hf.get(key):
            return None
        try:
            return reader(hf[key])
        except EngineSettingError as e:
            add(key, e.reason, e.fix, e.allowed)
            return None

    zero = read("deepspeed", read_deepspeed)
    fsdp = read("fsdp", parse_fsdp)
    read("fsdp_config", read_fsdp_config)
    if hf.get("fsdp_config") and not hf.get("fsdp"):
        add(
            "fsdp_config",
            "fsdp_config has no effect without fsdp",
            "set fsdp: full_shard auto_wrap, or remove fsdp_config",
        )
    if hf.get("deepspeed") and hf.get("fsdp"):
        add(
            "fsdp",
            "deepspeed and fsdp are both set; a run uses one engine",
            "keep deepspeed (e.g. zero3) or fsdp (e.g. full_shard auto_wrap), and remove the other",
        )
        return
    quantized, lora = v["quantization_bit"] is not None, v["finetuning_type"] == "lora"
    if quantized and zero is not None and zero.stage == 3:
        add(
            "quantization_bit",
            f"QLoRA cannot train under {zero.label}: tunesmith places the quantized weights whole on each "
            "GPU, and ZeRO-3 partitions parameters",
            "use deepspeed: zero2 (or no engine, DDP) with quantization_bit, or remove quantization_bit "
            "to train LoRA under ZeRO-3",
        )
    if quantized and fsdp is not None:
        add(
            "quantization_bit",
            "QLoRA cannot train under FSDP: tunesmith places the quantized weights whole on each GPU, and "
            "FSDP shards parameters",
            "use deepspeed: zero2 (or no engine, DDP) with quantization_bit, or remove quantization_bit "
            "to train LoRA under FSDP",
        )
    if hf.get("torch_compile") and (fsdp is not None or (zero is not None and zero.stage == 3)):
        add(
            "torch_compile",
            f"torch_compile cannot be used with {zero.label if zero is not None else 'FSDP'}: it gathers each "
            "layer's sharded weights in hooks around the layer, which tunesmith does not compile through",
            "set torch_compile: false, or train with DDP (no engine) or deepspeed: zero2",
        )
    if v["tiled_mlp_tokens"] is not None and (zero is not None or fsdp is not None):
        add(
            "tiled_mlp_tokens",
            f"tiled_mlp_tokens cannot be used with {zero.label if zero is not None else 'FSDP'}: the tiled "
            "MLP recomputes its tiles in backward and takes its weights' gradients itself, outside the engine's "
            "parameter hooks",
            "remove tiled_mlp_tokens, or train with DDP (no engine)",
        )
    if v["tiled_mlp_tokens"] is not None and hf.get("torch_compile"):
        add(
            "tiled_mlp_tokens",
            "tiled_mlp_tokens cannot be used with torch_compile: its backward computes gradients itself, "
            "which a compiled layer cannot trace",
            "remove tiled_mlp_tokens, or set torch_compile: false",
        )
    if v["offload_activations"] and (zero is not None or fsdp is not None):
        add(
            "offload_activations",
            f"offload_activations cannot be used with {zero.label if zero is not None else 'FSDP'}: the engine "
            "places, gathers and frees memory around each layer with hooks of its own; offloading is built and "
            "tested for one GPU or DDP only",
            "remove offload_activations, or train with DDP (no engine)",
        )
    if v["offload_activations"] and hf.get("torch_compile"):
        add(
            "offload_activations",
            "offload_activations cannot be used with torch_compile: its hooks open and close around each "
            "compiled decoder layer's call, which the compiler would have to trace",
            "remove offload_activations, or set torch_compile: false",
        )
    again = [k for k in ("gradient_checkpointing", "activation_checkpointing") if hf.get(k)]
    if v["offload_activations"] and again:
        add(
            again[0],
            f"{again[0]}: true makes transformers' Trainer turn checkpointing on again when training starts, "
            "which replaces the checkpoint function offload_activations wraps: offloading would silently stop",
            f"remove {again[0]} (offload_activations turns checkpointing on itself)",
        )
    if lora and v["pissa_init"] and zero is not None and zero.stage == 3:
        add(
            "pissa_init",
            "PiSSA decomposes each full weight matrix at start, and ZeRO-3 has already partitioned them",
            "train with deepspeed: zero2 or fsdp: full_shard auto_wrap, or set pissa_init: false",
        )
