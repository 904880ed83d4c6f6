"""Train a causal LM on pt or sft data: the whole run, top to bottom.

config -> tokenizer + template -> tokenized data (cached) -> model + tuning -> Trainer -> outputs
(weights, tokenizer with chat template, generation_config with stop ids, resolved config, run.json,
trainer_log.jsonl, loss plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import TunesmithError
from tunesmith.launcher import read_launch_env
from tunesmith.model.compile import compile_backend
from tunesmith.training.distributed import engine_kwargs
from tunesmith.training.setup import DataBundle, require_model

log = logging.getLogger("tunesmith")


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def resolve_resume(value: str | None, output_dir: Path) -> str | None:
    """`auto` -> the newest checkpoint in output_dir (or None); a path -> itself, checked."""
    if not value:
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last:
            log.info("resuming from the newest checkpoint: %s", last)
        else:
            log.info("resume_from_checkpoint: auto found no checkpoint in %s; starting fresh", output_dir)
        return last
    if not Path(value).is_dir():
        raise TunesmithError(
            f"resume_from_checkpoint: {value!r} is not a folder; give a checkpoint-N folder "
            f"or 'auto' for the newest one in output_dir"
        )
    return value


# What a previous run leaves in output_dir. With overwrite_output_dir these go first, so that e.g. a
# LoRA run over an earlier full run does not leave a stale model.safetensors beside the new adapter.
# Only these names are removed: output_dir may hold the user's own files.
_RUN_OUTPUTS = (
    "checkpoint-*",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "adapter_model.*",
    "adapter_config.json",
    "pissa_init",
    "trainer_log.jsonl",
    "training_*.png",
    "value_head.safetensors",
    "trainer_state.json",
    "all_results.json",
    "run.json",
    "watchdog_batch_step*.pt",
)


def _check_output_dir(cfg: Config, out: Path, resume: str | None, is_main: bool) -> None:
    if not out.is_dir() or not any(out.iterdir()) or resume:
        return
    if not cfg.training.overwrite_output_dir:
        raise TunesmithError(
            f"output_dir {str(out)!r} is not empty. Set overwrite_output_dir: true to write into it, "
            f"resume_from_checkpoint: auto to continue its newest checkpoint, or choose another output_dir"
        )
    import shutil

    for pattern in _RUN_OUTPUTS if is_main else ():
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _precision(cfg: Config) -> tuple[str, dict[str, bool]]:
    """The training dtype and the TrainingArguments flags (bf16/fp16) that go with it."""
    import torch

    from tunesmith.model.loader import resolve_dtype

    hf = cfg.training.hf
    if hf.get("bf16"):
        name = "bfloat16"
    elif hf.get("fp16"):
        name = "float16"
    else:
        name = cfg.model.dtype
    dtype = resolve_dtype(name, cuda=torch.cuda.is_available())
    return str(dtype).removeprefix("torch."), {
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }


def data_loading(kw: dict[str, Any], *, cuda: bool, local_world_size: int = 1) -> dict[str, Any]:
    """How batches reach a GPU, where the config does not say: built by 2 worker processes per GPU process
    (at most its share of the CPU cores, less one), kept alive across epochs, and copied to the device
    without blocking the host (pinned memory, accelerate's ``non_blocking``). Nothing changes on CPU.

    With no workers the GPU waited while the main process built each batch: 6-11 ms of every 0.34 s step
    of a compiled LoRA run on an H200 (bench/results/profile_step_gpu-2026-11-28T0518Z-compile-h200*);
    a blocking copy makes the host wait for the GPU at every batch.
    """
    if not cuda:
        return {}
    out: dict[str, Any] = {}
    if "dataloader_num_workers" not in kw:
        share = (os.cpu_count() or 1) // max(1, local_world_size)
        workers = max(0, min(2, share - 1))
        out = {"dataloader_num_workers": workers, "dataloader_persistent_workers": workers > 0}
    if "accelerator_config" not in kw and kw.get("dataloader_pin_memory", True):
        out["accelerator_config"] = {"non_blocking": True}
    return out


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 1)


def training_arguments(cfg: Config, has_eval: bool, precision: dict[str, bool]) -> Any:
    import torch
    from transformers import TrainingArguments

    # deepspeed preset names -> files, fsdp words -> FSDP2; several CPU processes -> a gloo process group
    world_size = read_launch_env(os.environ).world_size
    kw = engine_kwargs(cfg.training.hf_kwargs(), world_size, cuda=torch.cuda.is_available())
    kw.update(precision)
    kw["remove_unused_columns"] = False  # our collator needs every column it was given
    # torch_compile is ours: the decoder layers are compiled in place (model.compile), not the whole model
    for key in ("torch_compile", "torch_compile_mode", "torch_compile_backend"):
        kw.pop(key, None)
    kw.update(data_loading(kw, cuda=torch.cuda.is_available(), local_world_size=_local_world_size()))
    kw.setdefault("report_to", "none")
    kw.setdefault("logging_steps", 10)
    kw.setdefault("logging_first_step", True)
    # HF's NaN filter reads every micro-batch's loss on the host (a GPU sync per step); our watchdog
    # finds a NaN/inf loss anyway and stops the run with a diagnosis.
    kw.setdefault("logging_nan_inf_filter", False)
    # our token progress bar replaces HF's step bar (HF's own bar comes back with disable_tqdm: false)
    kw.setdefault("disable_tqdm", True)
    kw["resume_from_checkpoint"] = None  # passed to train() after resolving "auto"
    if cfg.finetuning.finetuning_type == "lora":
        # A PEFT model is no PreTrainedModel, so HF would make DDP search the autograd graph for unused
        # parameters after every forward; every LoRA weight takes part in every forward. A model whose
        # adapters can sit idle in a step (MoE experts) sets ddp_find_unused_parameters: true.
        kw.setdefault("ddp_find_unused_parameters", False)
    if has_eval:
        kw.setdefault("eval_strategy", "epoch")
        kw["do_eval"] = True
    if cfg.finetuning.early_stopping_steps:
        if not has_eval:
            raise TunesmithError("early_stopping_steps needs evaluation data: set val_size or eval_dataset")
        kw.setdefault("load_best_model_at_end", True)
        kw.setdefault("metric_for_best_model", "eval_loss")
        kw.setdefault("save_strategy", kw["eval_strategy"])
        if kw.get("save_strategy") == "steps" and "eval_steps" in kw:
            kw.setdefault("save_steps", kw["eval_steps"])
    return TrainingArguments(**kw)


def _load_model(
    cfg: Config, tokenizer: Any, dtype: str, *, padding_free: bool = False, defer_checkpointing: bool = False
) -> Any:
    """Load and tune the model. defer_checkpointing: load without gradient checkpointing, for
    `run_steps.auto_checkpointing` to decide once the model is on its GPU."""
    import torch

    from tunesmith.model.loader import load_model
    from tunesmith.model.tuning import TuningOptions, apply_tuning

    m, f = cfg.model, cfg.finetuning
    if m.flash_attn == "flex" and not torch.cuda.is_available():
        raise TunesmithError(
            f"flash_attn: flex trains on a CUDA GPU only: PyTorch's flex attention has no backward on CPU "
            f"(torch {torch.__version__}). Fix: use flash_attn: sdpa (or auto) to train on CPU"
        )
    loaded = load_model(
        require_model(cfg),
        dtype=dtype,
        attn=m.flash_attn,
        gradient_checkpointing=_checkpointing(m.disable_gradient_checkpointing, defer_checkpointing),
        trust_remote_code=m.trust_remote_code,
        quantization_bit=m.quantization_bit,
        tokenizer=tokenizer,
        resize_vocab=m.resize_vocab or bool(m.new_special_tokens),
        padding_free=padding_free,
        varlen_kernel=m.varlen_kernel,
    )
    options = TuningOptions(
        finetuning_type=f.finetuning_type,
        freeze_trainable_layers=f.freeze_trainable_layers,
        freeze_trainable_modules=f.freeze_trainable_modules,
        freeze_extra_modules=f.freeze_extra_modules,
        lora_rank=f.lora_rank,
        lora_alpha=f.lora_alpha,
        lora_dropout=f.lora_dropout,
        lora_target=f.lora_target,
        additional_target=f.additional_target,
        use_dora=f.use_dora,
        use_rslora=f.use_rslora,
        pissa_init=f.pissa_init,
        pissa_iter=f.pissa_iter,
        adapter_name_or_path=m.adapter_name_or_path,
        create_new_adapter=f.create_new_adapter,
    )
    tuned = apply_tuning(
        loaded.model,
        options,
        quantized=bool(m.quantization_bit),
        train_embedding_modules=loaded.train_embedding_modules,
    )
    _set_trainable_dtype(tuned.model, cfg)
    if m.tiled_mlp_tokens:
        from tunesmith.model.compile import decoder_layers
        from tunesmith.model.tiled_mlp import tile_mlps

        tile_mlps(decoder_layers(tuned.model), m.tiled_mlp_tokens)
    if m.offload_activations:
        from tunesmith.model.compile import decoder_layers
        from tunesmith.model.offload import ActivationOffload, CudaOps, offload_layer_inputs

        offload_layer_inputs(decoder_layers(tuned.model), ActivationOffload(CudaOps()))
    log.info("parameters: %s", _dtype_summary(tuned.model))
    checkpointing = "on" if loaded.gradient_checkpointing else "off"
    log.info(
        "model: %s | dtype %s | attention %s | gradient checkpointing %s",
        require_model(cfg),
        dtype,
        loaded.attn_implementation,
        "auto (decided on the GPU)" if defer_checkpointing else checkpointing,
    )
    return tuned


def _checkpointing(disable: bool | None, deferred: bool) -> bool | None:
    """load_model's gradient_checkpointing: unset -> None (on with a GPU), LLaMA-Factory's meaning when set
    (false: on, true: off); off for now when `auto` decides later."""
    if deferred:
        return False
    return None if disable is None else not disable


def _dtype_summary(model: Any) -> str:
    """e.g. "trained fp32 4.4M | frozen bf16 494.0M": what is trained, in which dtype."""
    from tunesmith.model.tuning import param_size

    counts: dict[tuple[str, str], int] = {}
    for param in model.parameters():
        key = ("trained" if param.requires_grad else "frozen", str(param.dtype).removeprefix("torch."))
        counts[key] = counts.get(key, 0) + param_size(param)
    return " | ".join(
        f"{kind} {dtype} {n / 1e6:.1f}M" for (kind, dtype), n in sorted(counts.items(), reverse=True)
    )


def _set_trainable_dtype(model: Any, cfg: Config) -> None:
    """Trained weights in fp32 with 16-bit compute (autocast), as LLaMA-Factory does.

    An AdamW update (about lr) is far below bf16's resolution for most weights, so pure bf16 full
    fine-tuning loses most updates: on 2x H200, 50 steps of Qwen2.5-0.5B at lr 1e-5 ended at loss 11.18
    in pure bf16 against 10.18 with fp32 master weights (bench/results/multi_gpu-*-full-*). `pure_bf16`
    opts out. DeepSpeed and FSDP keep fp32 master weights themselves, so full tuning leaves the model's
    dtype to them. DeepSpeed ZeRO-3 runs without autocast and wants one dtype for its packed partitions:
    there the adapters take the frozen weights' 16-bit dtype, DeepSpeed's own mixed precision (its
    optimizer keeps the fp32 master copies). A LoRA run on 2x H200 trains that way
    (bench/results/multi_gpu-*-lora-zero3-*); fp32 trained weights fed fp32 activations into ZeRO-3's
    bf16 linear there.
    """
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    hf = cfg.training.hf
    sharded = bool(hf.get("deepspeed") or hf.get("fsdp"))
    if cfg.finetuning.pure_bf16 or (sharded and cfg.finetuning.finetuning_type == "full"):
        return
    if hf.get("deepspeed") and is_deepspeed_zero3_enabled():
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        half = [d for d in (torch.bfloat16, torch.float16) if d in frozen]
        if half:
            for param in model.parameters():
                if param.requires_grad and param.is_floating_point():
                    param.data = param.data.to(half[0])
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def restore_loaded_dtype(model: Any, cfg: Config) -> None:
    """Full/freeze results are saved in the dtype the model was loaded in, not in the fp32 of training."""
    import torch

    hf = cfg.training.hf
    if cfg.finetuning.finetuning_type == "lora" or hf.get("deepspeed") or hf.get("fsdp"):
        return
    loaded = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(loaded, str):
        loaded = getattr(torch, loaded, None)
    if loaded in (torch.bfloat16, torch.float16):
        model.to(loaded)


def _total_tokens(data: DataBundle, args: Any) -> int | None:
    per_epoch = data.prepared.train.supervised_tokens()
    if args.max_steps and args.max_steps > 0:
        return None  # step-limited: the step ETA is the honest one
    return int(per_epoch * args.num_train_epochs)


def train_causal_lm(cfg: Config, kind: str) -> TrainResult:
    """Run one pt or sft training from a validated config."""
    from tunesmith.training.step_graphs import training_stream

    graphs, why_not = _cuda_graphs(cfg)
    # with graphs possible, everything from loading the model on runs on a side stream: with the model's first
    # backward on the default stream, the capture failed on an H200 ("operation would make the legacy stream
    # depend on a capturing blocking stream")
    with training_stream() if graphs is not False else contextlib.nullcontext():
        # the training model is freed on return: prediction loads the one just saved
        out, metrics, is_main = _train(cfg, kind, graphs, why_not)
    if cfg.training.do_predict and is_main:
        from tunesmith.infer.predict import predict_after_training

        predict_after_training(cfg, out)
    return TrainResult(out, metrics)


def _loss_rows_fraction(data: Any, args: Any, collator: Any) -> float:
    """The share of a static batch's width its loss rows are padded to (`collate.trained_fraction`): the
    most trained tokens any of 4,096 random batches of this data has; 1.0 for data without row counts."""
    from tunesmith.data.collate import trained_fraction

    if data is None or not hasattr(data, "trained_counts") or "position_ids" in data.column_names:
        return 1.0
    rows = min(args.per_device_train_batch_size, len(data))  # as capturing ahead counts them
    return trained_fraction(data.lengths(), data.trained_counts, rows, collator.pad_to_multiple_of)


def _cuda_graphs(cfg: Config) -> tuple[bool | None, list[str]]:
    """(the trainer's cuda_graphs, why they are off when tunesmith turned them off, to log).

    False where the config, the launch or the lack of a GPU rules graphs out (with cuda_graphs: true, an
    error instead); else the config's value (unset: the trainer decides at its second micro-batch, from
    what only the running model shows: `trainer.graph_obstacles`).
    """
    import torch

    from tunesmith.config_checks import cuda_graph_obstacles

    if cfg.training.cuda_graphs is False:
        return False, []
    found = cuda_graph_obstacles(cfg.to_flat_dict(), cfg.training.hf)
    if read_launch_env(os.environ).world_size > 1:
        found.append("several processes (gradients are all-reduced outside a captured step)")
    gpu = torch.cuda.is_available()
    if not gpu:
        found.append("no CUDA GPU")
    if not found:
        return cfg.training.cuda_graphs, []
    if cfg.training.cuda_graphs:  # the config's own obstacles were refused when it loaded
        raise TunesmithError(
            f"cuda_graphs: true, but this run's steps cannot be replayed as CUDA graphs: {'; '.join(found)}. "
            "Fix: remove cuda_graphs (graphs wherever the step allows them), or train on one GPU"
        )
    return False, found if gpu else []  # no GPU: nothing to say


def _train(
    cfg: Config, kind: str, cuda_graphs: bool | None, graphs_off: list[str]
) -> tuple[Path, dict[str, Any], bool]:
    """(output folder, metrics, whether this is the main process) of one pt or sft training; ``graphs_off``:
    why tunesmith turned CUDA graphs off (logged once logging is set up)."""
    from transformers import EarlyStoppingCallback

    from tunesmith.data.collate import CausalLMCollator
    from tunesmith.model.varlen import ATTN_NAME as VARLEN_ATTN
    from tunesmith.train_callbacks import training_callbacks
    from tunesmith.training.run_steps import finish_run, start_run
    from tunesmith.training.trainer import TunesmithTrainer, graph_obstacles, graphs_required_error

    run = start_run(cfg, kind)
    if graphs_off:
        log.info("cuda graphs: off (%s)", "; ".join(graphs_off))
    args, tuned, out = run.args, run.tuned, run.out
    bundle = training_callbacks(
        plot_loss=cfg.training.plot_loss,
        total_tokens=_total_tokens(run.data, args),
        progress_bar=args.disable_tqdm,
    )
    bf16_or_fp16 = run.precision["bf16"] or run.precision["fp16"]
    collator = CausalLMCollator(
        run.tokenizer.pad_token_id,
        pad_to_multiple_of=8 if bf16_or_fp16 else 1,
        boundaries=getattr(tuned.model.config, "_attn_implementation", None) == VARLEN_ATTN,
    )
    trainer = TunesmithTrainer(
        model=tuned.model,
        args=args,
        train_dataset=run.data.train,
        eval_dataset=run.data.eval,
        data_collator=collator,
        processing_class=run.tokenizer,
        callbacks_bundle=bundle,
        loraplus_lr_ratio=cfg.finetuning.loraplus_lr_ratio,
        stochastic_rounding=cfg.finetuning.pure_bf16 and cfg.finetuning.stochastic_rounding,
        loss_compile_backend=compile_backend(cfg.training.hf),
        fused_loss=not args.use_liger_kernel,  # Liger fuses the loss its own way, from the model's labels
        cuda_graphs=cuda_graphs,
        deferred_logging=cfg.training.deferred_logging,
    )
    obstacles = graph_obstacles(trainer, tuned.model)
    if not obstacles:
        # batches on a grid of shapes, so a run's steps fall into few CUDA graphs (training.step_graphs)
        trainer.train_collator = dataclasses.replace(
            collator,
            static_shapes=True,
            loss_rows_fraction=_loss_rows_fraction(run.data.train, args, collator),
        )
    elif cuda_graphs:
        raise graphs_required_error(obstacles)
    if cfg.finetuning.early_stopping_steps:
        trainer.add_callback(
            EarlyStoppingCallback(early_stopping_patience=cfg.finetuning.early_stopping_steps)
        )
    pissa = cfg.finetuning.pissa_init and cfg.finetuning.finetuning_type == "lora"
    pissa_dir = out / "pissa_init"
    if pissa and run.is_main:
        tuned.model.save_pretrained(pissa_dir)  # the initial adapter, for converting the result on save

    def convert_pissa() -> None:
        trainer.model.save_pretrained(out, path_initial_model_for_weight_conversion=str(pissa_dir))

    metrics = finish_run(
        run,
        trainer,
        eval_metrics=lambda ev: (
            {"eval_perplexity": math.exp(min(ev["eval_loss"], 50.0))} if "eval_loss" in ev else {}
        ),
        after_save=convert_pissa if pissa else None,
    )
    return out, metrics, run.is_main
