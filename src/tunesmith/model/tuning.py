"""Choose what trains: full, freeze (some layers/modules) or LoRA (DoRA, rsLoRA, PiSSA, QLoRA, resumed adapters).

Key names mirror LLaMA-Factory's. `apply_tuning` sets `requires_grad` and wraps LoRA models with peft;
`build_optimizer_param_groups` gives AdamW groups with LoRA+ learning rates and no decay on 1-D params.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from tunesmith.errors import TunesmithError

logger = logging.getLogger(__name__)

FinetuningType = Literal["full", "freeze", "lora"]
_LAYER_PARAM = re.compile(r"(?:^|\.)(\d+)\.([^.]+)")


@dataclass(frozen=True)
class TuningOptions:
    """How to fine-tune; the fields are LLaMA-Factory's keys and defaults."""

    finetuning_type: FinetuningType = "lora"
    # freeze: N > 0 trains the last N layers, N < 0 the first -N.
    freeze_trainable_layers: int = 2
    # freeze: module names inside those layers ("mlp", "self_attn", ...) or "all".
    freeze_trainable_modules: tuple[str, ...] = ("all",)
    # freeze: modules outside the layers to train too ("embed_tokens", "norm", "lm_head").
    freeze_extra_modules: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 * lora_rank
    lora_dropout: float = 0.0
    # "all": every nn.Linear except the output head and additional_target modules.
    lora_target: tuple[str, ...] = ("all",)
    # lora: modules trained fully and saved with the adapter (peft's modules_to_save).
    additional_target: tuple[str, ...] = ()
    use_dora: bool = False
    use_rslora: bool = False
    pissa_init: bool = False
    pissa_iter: int = 16  # -1: exact SVD (slow); N: randomized SVD with N subspace iterations
    # Adapters to start from; all but the last are merged, the last keeps training unless create_new_adapter.
    adapter_name_or_path: tuple[str, ...] = ()
    create_new_adapter: bool = False


@dataclass(frozen=True)
class TuningResult:
    """The model to train (a peft.PeftModel for lora) and what was made trainable."""

    model: Any
    finetuning_type: FinetuningType
    trainable_params: int
    all_params: int
    lora_targets: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    # Names of trainable params cast from fp16 to fp32: torch's GradScaler cannot unscale fp16 gradients.
    upcast_to_fp32: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return _format_summary(self.trainable_params, self.all_params)


def apply_tuning(
    model: Any,
    options: TuningOptions,
    *,
    quantized: bool = False,
    train_embedding_modules: Sequence[str] = (),
) -> TuningResult:
    """Set what trains per `options`; `train_embedding_modules` comes from `LoadedModel` (new tokens)."""
    if quantized and options.finetuning_type != "lora":
        raise TunesmithError(
            f"finetuning_type: {options.finetuning_type} cannot train a quantized model. "
            "Fix: use finetuning_type: lora (QLoRA) or remove quantization_bit"
        )
    if options.finetuning_type == "full":
        model.requires_grad_(True)
        result = _result(model, "full")
    elif options.finetuning_type == "freeze":
        result = _apply_freeze(model, options, tuple(train_embedding_modules))
    elif options.finetuning_type == "lora":
        result = _apply_lora(model, options, quantized, tuple(train_embedding_modules))
    else:
        raise TunesmithError(
            f"finetuning_type: unknown value {options.finetuning_type!r}; allowed: full, freeze, lora"
        )
    upcast = _upcast_fp16_trainable(result.model)
    if upcast:
        result = replace(result, upcast_to_fp32=upcast)
    logger.info("%s: %s", result.finetuning_type, result.summary)
    return result


def _apply_freeze(model: nn.Module, options: TuningOptions, embeddings: tuple[str, ...]) -> TuningResult:
    """Train the chosen layers' chosen modules plus extra modules; freeze the rest."""
    num_layers = model.config.num_hidden_layers
    n = options.freeze_trainable_layers
    if n == 0 or abs(n) > num_layers:
        raise TunesmithError(
            f"freeze_trainable_layers: got {n}; allowed: 1..{num_layers} (last N layers) or "
            f"-{num_layers}..-1 (first N). Fix: pick a non-zero N within the model's {num_layers} layers"
        )
    layer_ids = range(num_layers - n, num_layers) if n > 0 else range(-n)
    layer_modules, outer_modules = _module_inventory(model)
    wanted = set(options.freeze_trainable_modules)
    _check_names("freeze_trainable_modules", wanted - {"all"}, layer_modules)
    extra = set(options.freeze_extra_modules)
    _check_names("freeze_extra_modules", extra, outer_modules)
    extra |= set(embeddings)
    for name, param in model.named_parameters():
        layer = _LAYER_PARAM.search(name)
        if layer:
            trainable = int(layer.group(1)) in layer_ids and ("all" in wanted or layer.group(2) in wanted)
        else:
            trainable = name.split(".")[-2] in extra
        param.requires_grad_(trainable)
    return _result(model, "freeze")


def _apply_lora(
    model: nn.Module, options: TuningOptions, quantized: bool, embeddings: tuple[str, ...]
) -> TuningResult:
    """Wrap `model` with a new or resumed LoRA adapter; see `TuningOptions` for the keys."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if options.lora_rank <= 0:
        raise TunesmithError(f"lora_rank: got {options.lora_rank}; allowed: a positive int. Fix: use 8")
    if quantized:
        if len(options.adapter_name_or_path) > 1 or (
            options.adapter_name_or_path and options.create_new_adapter
        ):
            raise TunesmithError(
                "adapter_name_or_path: a quantized model can only continue one adapter (merging needs full "
                "weights). Fix: merge the adapters into the base model first (tunesmith export)"
            )
        # The base is frozen and kept in the dtype it was loaded in. peft's prepare_model_for_kbit_training
        # would also cast every weight that is not quantized to fp32: for Llama-3.1-8B the embeddings and
        # the output head alone grow from 2 to 4 GiB, past a 7 GiB QLoRA budget. The fused loss computes
        # the logits in fp32 chunks and RMSNorm normalises in fp32 anyway (LLaMA-Factory does not upcast
        # either, unless asked).
        for param in model.parameters():
            param.requires_grad_(False)

    adapters = list(options.adapter_name_or_path)
    resume = None if options.create_new_adapter or not adapters else adapters.pop()
    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
        logger.info("merged adapter %s into the base model", path)
    if resume is not None:
        config = None if quantized else _resumed_lora_config(model, resume)
        model = PeftModel.from_pretrained(model, resume, is_trainable=True, config=config)
        config = model.peft_config["default"]
        logger.info("continuing adapter %s", resume)
        return _result(
            model, "lora", tuple(sorted(config.target_modules)), tuple(sorted(config.modules_to_save or ()))
        )

    linear_names = _linear_names(model)
    to_save = tuple(sorted(set(options.additional_target) | set(embeddings)))
    _check_names("additional_target", set(options.additional_target), {n for n, _ in model.named_modules()})
    if options.lora_target == ("all",):
        targets = tuple(sorted(linear_names - set(to_save)))
    else:
        _check_names("lora_target", set(options.lora_target), linear_names)
        targets = tuple(sorted(options.lora_target))
    init: bool | str = True
    if options.pissa_init:
        init = "pissa" if options.pissa_iter == -1 else f"pissa_niter_{options.pissa_iter}"
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=options.lora_rank,
        lora_alpha=options.lora_alpha or 2 * options.lora_rank,
        lora_dropout=options.lora_dropout,
        target_modules=list(targets),
        modules_to_save=list(to_save) or None,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        init_lora_weights=init,
        # Tied embeddings trained via modules_to_save must stay tied in the saved adapter.
        ensure_weight_tying=bool(to_save) and model.config.tie_word_embeddings,
    )
    if not quantized:  # quantized linears subclass nn.Linear: they keep PEFT's (bitsandbytes) layers
        _fuse_lora_layers(model, config, targets)
    model = get_peft_model(model, config)
    return _result(model, "lora", targets, to_save)


def _resumed_lora_config(model: nn.Module, path: str) -> Any:
    """A continued LoRA adapter's own config with the fused layers registered (`_fuse_lora_layers`), or None
    (PEFT reads the config itself) for another adapter type or targets given as a pattern."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig) or not isinstance(config.target_modules, (list, set, tuple)):
        return None
    _fuse_lora_layers(model, config, tuple(config.target_modules))
    return config


def _fuse_lora_layers(model: nn.Module, config: Any, targets: Sequence[str]) -> None:
    """New adapters on plain full-precision linears get `lora_fused.FusedLoraLinear` (PEFT's layer, with the
    adapter's update fused into the base matmul while a CUDA graph is captured); other targets (a
    pre-quantized checkpoint, linear subclasses) and a PEFT whose layer module moved keep PEFT's layers."""
    try:
        from tunesmith.model.lora_fused import plain_linear_targets, register_fused_lora
    except ImportError as e:
        logger.info("lora: PEFT's own LoRA layers (the fused layer needs peft.tuners.lora.layer: %s)", e)
        return
    if plain_linear_targets(model, targets):
        register_fused_lora(config)


def _linear_names(model: nn.Module) -> set[str]:
    """Short names of the nn.Linear modules (bnb's quantized linears subclass it), the output head excluded."""
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
    }
    # A short name shared with the head would make peft wrap the head too.
    return names - head_names


def _module_inventory(model: nn.Module) -> tuple[set[str], set[str]]:
    """(module names directly inside a numbered layer, names of modules holding params outside layers)."""
    inside, outside = set(), set()
    for name, _ in model.named_parameters():
        layer = _LAYER_PARAM.search(name)
        if layer:
            inside.add(layer.group(2))
        else:
            outside.add(name.split(".")[-2])
    return inside, outside


def _check_names(key: str, names: set[str], available: set[str]) -> None:
    short = {n.rsplit(".", 1)[-1] for n in available} | available
    missing = sorted(names - short)
    if missing:
        raise TunesmithError(
            f"{key}: {', '.join(missing)} not found in the model; allowed: "
            f"{', '.join(sorted(n for n in short if n and not n.isdigit()))}"
        )


def _upcast_fp16_trainable(model: nn.Module) -> tuple[str, ...]:
    """Cast trainable fp16 params to fp32 (bf16 ones stay: the HF Trainer trains them as loaded)."""
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
            names.append(name)
    return tuple(names)


def _result(
    model: nn.Module, kind: FinetuningType, targets: tuple[str, ...] = (), to_save: tuple[str, ...] = ()
) -> TuningResult:
    trainable, total = count_params(model)
    return TuningResult(model, kind, trainable, total, targets, to_save)


def param_size(param: nn.Parameter) -> int:
    """Values a parameter holds: a 4-bit bitsandbytes tensor stores two per element, and a DeepSpeed
    ZeRO-3 parameter's full size is its `ds_numel` (the local tensor is an empty placeholder)."""
    n = getattr(param, "ds_numel", None) or param.numel()
    return n * 2 if param.__class__.__name__ == "Params4bit" else n


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts (see `param_size`)."""
    trainable = total = 0
    for param in model.parameters():
        n = param_size(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """E.g. "trainable params: 1,234 / 5,678 (21.7%)"."""
    return _format_summary(*count_params(model))


def _format_summary(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.1f}%)"


def build_optimizer_param_groups(
    model: nn.Module, lr: float, loraplus_lr_ratio: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """AdamW param groups: no decay on 1-D params (biases, norms); LoRA+ gives lora_B lr * ratio."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = loraplus_lr_ratio is not None and ("lora_B" in name or "lora_embedding_B" in name)
        decay = param.ndim >= 2
        groups.setdefault((is_b, decay), []).append(param)
    ratio = loraplus_lr_ratio or 1.0
    return [
        {"params": params, "lr": lr * ratio if is_b else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_b, decay), params in sorted(groups.items())
    ]
