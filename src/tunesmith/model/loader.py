"""Load a tokenizer and a causal LM for training: dtype, attention kernel, checkpointing, quantization, vocab.

Every automatic choice is resolved here once and returned in `LoadedModel`, so a stage can log and act on
it (for example: enable loss scaling when fp16 was chosen).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.errors import TunesmithError
from tunesmith.model.varlen import ATTN_NAME as VARLEN_ATTN

logger = logging.getLogger(__name__)

AttnChoice = Literal["auto", "sdpa", "eager", "fa2", "disabled"]
# "disabled" is LLaMA-Factory's spelling of eager attention.
_ATTN_NAMES = {
    "sdpa": "sdpa",
    "eager": "eager",
    "disabled": "eager",
    "fa2": "flash_attention_2",
    # PyTorch's flex attention: packed rows get a block mask per document, so the blocks between documents
    # are skipped instead of computed and masked (sdpa's dense 4-D mask); compiled by transformers. Measured
    # 5.9x slower than sdpa on an H200 (bench/README.md), so a warning says so.
    "flex": "flex_attention",
    # PyTorch's flash-attention varlen kernel over each document of packed rows (tunesmith.model.varlen).
    "varlen": VARLEN_ATTN,
}
_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
QLORA_FIX = "QLoRA needs a CUDA GPU and bitsandbytes: pip install 'tunesmith[bnb]'"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for `apply_tuning`, with every choice the loader made."""

    model: Any  # transformers.PreTrainedModel
    dtype: torch.dtype
    attn_implementation: str
    # fp16 weights/compute: the trainer must use a loss scaler (HF Trainer: fp16=True).
    fp16_loss_scaling: bool
    gradient_checkpointing: bool
    quantization_bit: int | None
    embeddings_resized: bool
    # Short module names (e.g. "embed_tokens", "lm_head") that must be trained and saved with an adapter
    # because the vocabulary gained tokens; empty when it did not.
    train_embedding_modules: tuple[str, ...]


def load_tokenizer(
    path: str | Path, *, trust_remote_code: bool = False, new_special_tokens: Sequence[str] = ()
) -> Any:
    """Load a tokenizer for training: right padding, a pad token, and any new special tokens added."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunesmithError(
            f"cannot load a tokenizer from {str(path)!r}: {e}. Fix: model_name_or_path must be a folder with "
            "tokenizer files (tokenizer.json or a slow tokenizer's vocab) or a cached hub id"
        ) from e
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TunesmithError(
                f"tokenizer {str(path)!r} has no pad, eos or unk token to pad with. "
                "Fix: add a pad token to its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token: padding with %r", fallback)
    new = [t for t in new_special_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
        logger.info("added %d new special token(s): %s", len(new), ", ".join(new))
    return tokenizer


def resolve_dtype(dtype: str | torch.dtype, *, cuda: bool) -> torch.dtype:
    """`auto` -> bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU; names map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    elif dtype in _DTYPE_NAMES:
        chosen = _DTYPE_NAMES[dtype]
    else:
        raise TunesmithError(
            f"dtype: unknown value {dtype!r}; allowed: auto, {', '.join(_DTYPE_NAMES)}. Fix: use dtype: auto"
        )
    if chosen == torch.bfloat16 and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise TunesmithError(
            f"dtype: bf16 was asked for but {torch.cuda.get_device_name()} has no bf16 support. "
            "Fix: use fp16 (with loss scaling) or dtype: auto"
        )
    return chosen


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding, also under DeepSpeed ZeRO-3, whose local weight is an empty placeholder
    (its full shape is in `ds_shape`): reading `weight.shape` there gave 0 rows, a needless resize, and
    trained embeddings in a LoRA run."""
    weight = model.get_input_embeddings().weight
    shape = getattr(weight, "ds_shape", None)
    return int(shape[0] if shape is not None else weight.shape[0])


def resolve_attn(
    attn: str, *, cuda: bool, dtype: torch.dtype, config: Any = None, padding_free: bool = False,
    varlen_kernel: str = "auto",
) -> str:  # fmt: skip
    """`auto` -> flash_attention_2 when flash-attn is usable (CUDA, half precision); else, for a training
    whose collator sends document boundaries (`padding_free`), PyTorch's varlen attention when this torch
    has it and the model's attention (`config`) is one it computes; else sdpa."""
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.bfloat16, torch.float16)
    if attn == "auto":
        if cuda and half and is_flash_attn_2_available():
            return "flash_attention_2"
        if cuda and half and padding_free and config is not None:
            return _auto_varlen(config, dtype, varlen_kernel)
        return "sdpa"
    if attn not in _ATTN_NAMES:
        raise TunesmithError(
            f"flash_attn: unknown value {attn!r}; allowed: auto, {', '.join(_ATTN_NAMES)}. Fix: use auto"
        )
    if attn == "fa2" and not (cuda and half and is_flash_attn_2_available()):
        raise TunesmithError(
            "flash_attn: fa2 needs a CUDA GPU, bf16/fp16 and the flash-attn package "
            f"(cuda={cuda}, dtype={dtype}). Fix: pip install flash-attn, or use flash_attn: sdpa"
        )
    if attn == "flex" and cuda:
        logger.warning(
            "flash_attn: flex trained 5.9x slower than sdpa in tunesmith's benchmark (packed LoRA rows, H200, "
            "torch 2.11: bench/results/profile_step_gpu-2026-11-28T0523Z-flex-h200.json); sdpa or varlen "
            "is likely faster"
        )
    if attn == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise TunesmithError(
            f"flash_attn: flex needs PyTorch's flex attention (torch >= 2.5; this is {torch.__version__}). "
            "Fix: upgrade torch, or use flash_attn: sdpa"
        )
    if attn == "varlen":
        from tunesmith.model import varlen

        if not varlen.available():
            raise TunesmithError(
                f"flash_attn: varlen needs PyTorch's varlen attention (torch >= 2.10; this is {torch.__version__}). "
                "Fix: upgrade torch, or use flash_attn: sdpa"
            )
        head_size = varlen.head_dim(config) if config else 64
        return varlen.register(cuda=cuda, dtype=dtype, head_size=head_size, kernel=varlen_kernel)
    return _ATTN_NAMES[attn]


def _auto_varlen(config: Any, dtype: torch.dtype, kernel: str = "auto") -> str:
    """varlen for `auto` (1.41x SDPA's trained tokens/s, compiled packed LoRA on an H100:
    bench/results/train_throughput-2026-11-28T0703Z-qwen-lora-varlen-h100.json), sdpa where it cannot run."""
    from tunesmith.model import varlen

    if not varlen.available():
        return "sdpa"
    if varlen.uses_attention_interface(config) is None:  # remote code: it may ignore the boundaries
        return "sdpa"
    missing = varlen.unsupported(config)
    if missing:
        logger.info("flash_attn: auto: sdpa, since varlen does not compute %s", ", ".join(missing))
        return "sdpa"
    try:
        return varlen.register(cuda=True, dtype=dtype, head_size=varlen.head_dim(config), kernel=kernel)
    except TunesmithError as e:  # this torch's kernel cannot train on this GPU: sdpa, and say why
        logger.warning("flash_attn: auto: using sdpa; %s", e)
        return "sdpa"


def quantization_config(bits: int, compute_dtype: torch.dtype, *, cuda: bool) -> Any:
    """A BitsAndBytesConfig for 4-bit NF4 (double quant) or 8-bit loading; clear error without CUDA/bnb."""
    if bits not in (4, 8):
        raise TunesmithError(
            f"quantization_bit: got {bits!r}; allowed: 4, 8. Fix: use 4 (QLoRA) or remove it"
        )
    if not cuda or importlib.util.find_spec("bitsandbytes") is None:
        where = "no CUDA GPU is visible" if not cuda else "bitsandbytes is not installed"
        raise TunesmithError(f"quantization_bit: {bits}: {where}. {QLORA_FIX}")
    return bnb_config(bits, compute_dtype)


def bnb_config(bits: int, compute_dtype: torch.dtype) -> Any:
    """NF4 with double quantization and compute in ``compute_dtype`` (4), or LLM.int8 (8)."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn: str = "auto",
    gradient_checkpointing: bool | None = None,
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
    device_map: str | dict[str, Any] | None = None,
    tokenizer: Any = None,
    resize_vocab: bool = False,
    padding_free: bool = False,
    varlen_kernel: str = "auto",
) -> LoadedModel:
    """Load a causal LM for training, resolving every `auto` choice (see `LoadedModel`).

    tokenizer: when it has more tokens than the model has embedding rows, the embeddings grow (new rows
    from the old rows' mean and covariance, transformers' `mean_resizing`) to exactly len(tokenizer).
    resize_vocab: the tokenizer gained tokens (LLaMA-Factory's key; set it whenever new_special_tokens
    were added), so the embeddings and head must be trained even when no rows had to be added.
    gradient_checkpointing: None means on with a GPU, off on CPU.
    padding_free: the caller's collator sends document boundaries when the attention is varlen (pt and sft
    training), so `auto` may pick varlen on a GPU.
    varlen_kernel: the kernel varlen attention runs on a GPU (`fa4.choose`).
    """
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    chosen_dtype = resolve_dtype(dtype, cuda=cuda)
    kwargs: dict[str, Any] = {"dtype": chosen_dtype, "trust_remote_code": trust_remote_code}
    config = None
    if cuda and (attn == "varlen" or (attn == "auto" and padding_free)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    chosen_attn = resolve_attn(
        attn,
        cuda=cuda,
        dtype=chosen_dtype,
        config=config,
        padding_free=padding_free,
        varlen_kernel=varlen_kernel,
    )
    # For auto and sdpa, transformers picks sdpa where the model supports it, else eager.
    if attn != "auto" or chosen_attn != "sdpa":
        kwargs["attn_implementation"] = chosen_attn
    if quantization_bit is not None:
        kwargs["quantization_config"] = quantization_config(quantization_bit, chosen_dtype, cuda=cuda)
        # bitsandbytes weights are placed at load time; one process holds one whole model.
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise TunesmithError(
            f"cannot load a model from {str(path)!r}: {e}. Fix: model_name_or_path must be a folder with "
            "config.json and weights, or a hub id already in the local cache"
        ) from e

    if chosen_attn == VARLEN_ATTN:
        from tunesmith.model.varlen import check_model

        check_model(model.config)
    old_rows = embedding_rows(model)
    resized = tokenizer is not None and len(tokenizer) > old_rows
    if resized:
        # exactly len(tokenizer): peft's AutoPeftModel resizes the base to that size before loading saved embeddings
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("resized embeddings from %d to %d rows", old_rows, embedding_rows(model))
    train_embeddings = embedding_module_names(model) if (resized or resize_vocab) else ()

    checkpointing = cuda if gradient_checkpointing is None else gradient_checkpointing
    if checkpointing:
        enable_gradient_checkpointing(model)
    return LoadedModel(
        model=model,
        dtype=chosen_dtype,
        attn_implementation=model.config._attn_implementation,
        fp16_loss_scaling=chosen_dtype == torch.float16,
        gradient_checkpointing=checkpointing,
        quantization_bit=quantization_bit,
        embeddings_resized=resized,
        train_embedding_modules=train_embeddings,
    )


def embedding_module_names(model: Any) -> tuple[str, ...]:
    """Short names of the input embedding and output head modules, e.g. ("embed_tokens", "lm_head")."""
    targets = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is t for t in targets)}
    return tuple(sorted(names))


def enable_gradient_checkpointing(model: Any) -> None:
    """Turn on activation checkpointing (non-reentrant, so frozen inputs need no hooks) and the KV cache off."""
    kwargs = {"use_reentrant": False}
    # transformers renamed the method; the old name warns (and goes in v6).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The cache is useless while training and conflicts with recomputation.
    model.config.use_cache = False
