"""The steps every training run shares, start to end: one place for the sft, preference and RL stages.

``start_run`` goes from a config to data, model and a started run.json; ``finish_run`` trains, evaluates
and writes the outputs. A stage builds its Trainer in between and adds only what is its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import Config, write_resolved_config
from tunesmith.errors import TunesmithError
from tunesmith.launcher import LaunchEnv, configure_logging, read_launch_env
from tunesmith.model.compile import compile_backend
from tunesmith.training.distributed import engine_label, local_main_first
from tunesmith.training.setup import DataBundle, prepare_data, require_model, template_for

if TYPE_CHECKING:
    from tunesmith.training.checkpoint_plan import CheckpointPlan

log = logging.getLogger("tunesmith")


@dataclass
class RunStart:
    """What a stage needs to build its Trainer."""

    cfg: Config
    launch: LaunchEnv
    out: Path
    resume: str | None
    dtype: str
    precision: dict[str, Any]
    tokenizer: Any
    template: Any
    args: Any  # transformers.TrainingArguments
    data: DataBundle
    tuned: Any  # model.tuning.TuningResult
    manifest: Any  # runs.RunManifest on the main process, else None

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0


def start_run(cfg: Config, kind: str, check_args: Callable[[Any], None] | None = None) -> RunStart:
    """Logging, output_dir, tokenizer, template, TrainingArguments, data (local rank 0 first), model."""
    from transformers import set_seed

    from tunesmith.data.cache import tokenizer_digest
    from tunesmith.model.loader import load_tokenizer
    from tunesmith.runs import start_run_manifest
    from tunesmith.training.causal_lm import (
        _check_output_dir,
        _load_model,
        _precision,
        resolve_resume,
        training_arguments,
    )

    launch = read_launch_env(os.environ)
    configure_logging(launch.rank, launch.world_size, launch.rendezvous, engine_label(cfg.training.hf))
    if not cfg.training.output_dir:
        raise TunesmithError("output_dir is not set: where should checkpoints and the trained model go?")
    out = Path(cfg.training.output_dir)
    resume = resolve_resume(cfg.training.resume_from_checkpoint, out)
    _check_output_dir(cfg, out, resume, is_main=launch.rank == 0)

    dtype, precision = _precision(cfg)
    tokenizer = load_tokenizer(
        require_model(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        new_special_tokens=cfg.model.new_special_tokens,
    )
    template = template_for(cfg, tokenizer)
    # Creating TrainingArguments sets up the process group, so each node's local rank 0 can tokenize
    # first and the other ranks then read its cache; they wait on a barrier of their own with a long
    # timeout, so a long tokenization cannot trip the training group's timeout.
    args = training_arguments(cfg, bool(cfg.data.val_size or cfg.data.eval_dataset), precision)
    if check_args is not None:
        check_args(args)
    with local_main_first(launch.local_rank):
        data = prepare_data(cfg, tokenizer, template, kind, is_main=args.process_index == 0)
    # New LoRA weights (and value heads) are drawn while loading, before the Trainer seeds: seed first,
    # so that a run repeats.
    set_seed(cfg.training.seed)
    import torch

    from tunesmith.training import checkpoint_plan

    hf = cfg.training.hf
    auto_ckpt = checkpoint_plan.decides(
        disable=cfg.model.disable_gradient_checkpointing,
        kind=kind,
        quantized=bool(cfg.model.quantization_bit),
        sharded=bool(hf.get("deepspeed") or hf.get("fsdp")),
        cuda=torch.cuda.is_available(),
    )
    # pt and sft batches carry document boundaries under varlen (train_causal_lm's collator), one row a
    # batch, whose length NEFTune would take for the padded rows' (config_checks refuses an explicit varlen)
    neftune = bool(hf.get("neftune_noise_alpha"))
    if neftune and cfg.model.flash_attn == "auto" and torch.cuda.is_available():
        log.info("flash_attn: auto: sdpa, since NEFTune scales its noise by the padded row length")
    tuned = _load_model(
        cfg,
        tokenizer,
        dtype,
        padding_free=kind in ("pt", "sft") and not neftune,
        defer_checkpointing=auto_ckpt,
    )
    if auto_ckpt:
        auto_checkpointing(tuned.model, tokens=args.per_device_train_batch_size * cfg.data.cutoff_len,
                           device=args.device, precision=precision)  # fmt: skip
    backend = compile_backend(hf)
    if fused_layers_wanted(
        cfg.model.fused_layers, cuda=torch.cuda.is_available(), compiled=backend is not None
    ):
        from tunesmith.model.fused_layers import fuse_layers

        fuse_layers(tuned.model)
    if backend is not None:  # with FSDP or ZeRO-3 it is refused when the config loads
        from tunesmith.model.compile import compile_decoder_layers

        compile_decoder_layers(tuned.model, mode=hf.get("torch_compile_mode"), backend=backend)

    manifest = None
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, out)
        manifest = start_run_manifest(
            out,
            cfg.to_flat_dict(),
            {c.name: c.key for c in data.prepared.converted},
            tokenizer_digest(tokenizer),
            cfg.training.seed,
        )
    return RunStart(
        cfg, launch, out, resume, dtype, precision, tokenizer, template, args, data, tuned, manifest
    )


def fused_layers_wanted(setting: bool | None, *, cuda: bool, compiled: bool) -> bool:
    """`fused_layers`: unset, on with a GPU; never with torch_compile (logged when asked for), whose inductor
    fuses the same ops itself and would only have the wrappers to trace."""
    if not (setting or (setting is None and cuda)):
        return False
    if compiled:
        log.info("fused layers: off (torch_compile fuses these layers itself)")
        return False
    return True


def auto_checkpointing(
    model: Any, *, tokens: int, device: Any, precision: dict[str, bool], device_bytes: int | None = None
) -> CheckpointPlan:
    """Gradient checkpointing `auto` (training.checkpoint_plan): measured on ``device``, turned on if the
    run does not fit in half the card without it; logged with its numbers."""
    import torch

    from tunesmith.model.loader import embedding_rows, enable_gradient_checkpointing
    from tunesmith.training import checkpoint_plan
    from tunesmith.training.lora_casting import inputs_uncast, layers_to_uncast

    autocast = torch.bfloat16 if precision["bf16"] else torch.float16 if precision["fp16"] else None
    layers = layers_to_uncast(model, autocast=autocast is not None, engine=False)  # auto runs no engine
    try:
        found = checkpoint_plan.decide(
            model,
            tokens=tokens,
            vocab_size=embedding_rows(model),
            device=torch.device(device),
            autocast_dtype=autocast,
            uncast=lambda: inputs_uncast(layers),
            device_bytes=device_bytes,
        )
    except (RuntimeError, TypeError, ValueError) as e:  # a probe must not stop a run: fall back to on
        found = checkpoint_plan.CheckpointPlan(True, f"the activation probe failed ({type(e).__name__}: {e})")
    if found.on:
        enable_gradient_checkpointing(model)
    state, other = ("on", "true") if found.on else ("off", "false")
    log.info(
        "gradient checkpointing %s (auto): %s. Set disable_gradient_checkpointing: %s to have it %s",
        state, found.reason, other, "off" if found.on else "on",
    )  # fmt: skip
    return found


def finish_run(
    run: RunStart,
    trainer: Any,
    *,
    lm: Any = None,
    eval_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    before_save: Callable[[], None] | None = None,
    after_save: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train (run.json says completed / failed / interrupted), evaluate, save; returns the metrics.

    lm: the language model whose generation_config is written (default: the trainer's model).
    eval_metrics: extra metrics derived from the evaluation's (e.g. perplexity).
    """
    from tunesmith.model.attention import sdpa_kernels
    from tunesmith.runs import finish_run_manifest
    from tunesmith.training.causal_lm import restore_loaded_dtype
    from tunesmith.training.outputs import save_tokenizer_and_generation_config

    if compile_backend(run.cfg.training.hf) is not None:
        from tunesmith.training.recompile_notice import RecompileNotice

        trainer.add_callback(RecompileNotice())
    status = "failed"
    try:
        with sdpa_kernels():
            result = trainer.train(resume_from_checkpoint=run.resume)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if run.manifest is not None and status != "completed":
            finish_run_manifest(run.manifest, {}, status)

    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        with sdpa_kernels():
            evaluated = trainer.evaluate()
        metrics.update(evaluated)
        if eval_metrics is not None:
            metrics.update(eval_metrics(evaluated))
    if before_save is not None:
        before_save()
    restore_loaded_dtype(trainer.model, run.cfg)
    trainer.save_model(str(run.out))
    if run.is_main:
        if after_save is not None:
            after_save()
        save_tokenizer_and_generation_config(run.out, run.tokenizer, run.template, lm or trainer.model)
        trainer.save_state()
        trainer.save_metrics("all", metrics)
        finish_run_manifest(run.manifest, metrics, "completed")
    log.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


__all__ = ["RunStart", "finish_run", "start_run"]
