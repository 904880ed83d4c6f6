"""A whole rm / dpo / kto run, top to bottom, on the machinery of causal_lm.py.

config -> tokenizer + template -> pairwise or kto data (cached) -> model + tuning (+ value head for rm)
-> reference (dpo/kto; optionally its log-probs precomputed once) -> trainer -> outputs (weights, value
head for rm, tokenizer with chat template, generation_config, resolved config, run.json, trainer_log.jsonl
with the preference metrics, loss and reward plots).
"""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import TunesmithError
from tunesmith.model.compile import compile_backend
from tunesmith.training.causal_lm import (
    TrainResult,
)
from tunesmith.training.pref_losses import REFERENCE_FREE
from tunesmith.training.reference import Reference

log = logging.getLogger("tunesmith")


def _reference(cfg: Config, tuned: Any, tokenizer: Any, dtype: str) -> Reference:
    """none (orpo/simpo), ref_model, the adapter-disabled policy (LoRA), or the initial policy (full/freeze)."""
    from tunesmith.training.reference import reference_for

    f = cfg.finetuning
    if f.stage == "dpo" and f.pref_loss in REFERENCE_FREE:
        if f.ref_model:
            log.warning(
                "pref_loss %s needs no reference: ref_model %s is not loaded", f.pref_loss, f.ref_model
            )
        return Reference("none")
    # precomputing uses the initial policy before its first update: no copy needed
    return reference_for(cfg, tuned.model, tokenizer, dtype, copy_policy=not f.pref_precompute_ref)


def _reference_key(cfg: Config, data_key: str, split: str, dtype: str) -> dict[str, Any]:
    """What the precomputed reference log-probs depend on (cache key)."""
    from tunesmith.training.reference import files_fingerprint

    f, m = cfg.finetuning, cfg.model
    if f.ref_model:
        paths = [f.ref_model, *f.ref_model_adapters]
    else:  # the initial policy (or its base for LoRA): the model and every adapter it starts from
        paths = [m.model_name_or_path, *m.adapter_name_or_path]
    return {
        "data": data_key,
        "split": split,
        "stage": f.stage,
        "ref_model": bool(f.ref_model),
        "finetuning_type": f.finetuning_type,
        "create_new_adapter": f.create_new_adapter,
        "paths": [str(p) for p in paths],
        "files": files_fingerprint(paths),
        "dtype": dtype,
        "version": 1,
    }


def _precompute(trainer: Any, cfg: Config, data_key: str, dtype: str, collator: Any) -> None:
    """Attach cached/computed reference log-probs to the train and eval rows; drop the reference model."""
    from tunesmith.data.collate_pref import WithColumns
    from tunesmith.training.reference import cached_reference_columns, reference_columns

    def columns(dataset: Any, split: str) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            log.info("computing reference log-probs of %d %s rows", len(dataset), split)
            return reference_columns(
                trainer.reference,
                trainer.accelerator.unwrap_model(trainer.model),
                dataset,
                collator,
                trainer.ref_columns,
                batch_size=trainer.args.per_device_eval_batch_size,
                device=trainer.args.device,
            )

        key = _reference_key(cfg, data_key, split, dtype)
        return cached_reference_columns(cfg.data.data_cache_dir or "~/.cache/tunesmith", key, compute)

    with trainer.args.main_process_first(desc="reference log-probs"):
        trainer.train_dataset = WithColumns(trainer.train_dataset, columns(trainer.train_dataset, "train"))
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = WithColumns(trainer.eval_dataset, columns(trainer.eval_dataset, "eval"))
    trainer.reference = Reference("precomputed")


def _preference_trainer(
    cfg: Config, tuned: Any, tokenizer: Any, dtype: str, data: Any, multiple: int, common: dict[str, Any]
) -> Any:
    """The DPO or KTO trainer with its reference; a precomputed reference's model is freed on return."""
    from tunesmith.data.collate_pref import KTOCollator, KTOPairs, PairwiseCollator
    from tunesmith.training.preference import DPOTrainer, KTOTrainer

    f = cfg.finetuning
    reference = _reference(cfg, tuned, tokenizer, dtype)
    pref = {"reference": reference, "beta": f.pref_beta, "ftx": f.pref_ftx}
    if f.stage == "dpo":
        collator: Any = PairwiseCollator(tokenizer.pad_token_id, multiple)
        trainer: Any = DPOTrainer(
            model=tuned.model, train_dataset=data.train, eval_dataset=data.eval, data_collator=collator,
            loss_type=f.pref_loss, label_smoothing=f.dpo_label_smoothing, simpo_gamma=f.simpo_gamma,
            **pref, **common,
        )  # fmt: skip
    else:
        collator = KTOCollator(tokenizer.pad_token_id, multiple)
        trainer = KTOTrainer(
            model=tuned.model, train_dataset=KTOPairs(data.train), data_collator=collator,
            eval_dataset=KTOPairs(data.eval) if data.eval is not None else None,
            desirable_weight=f.kto_chosen_weight, undesirable_weight=f.kto_rejected_weight,
            **pref, **common,
        )  # fmt: skip
    if f.pref_precompute_ref and reference.kind != "none":
        _precompute(trainer, cfg, data.prepared.key, dtype, collator)
    return trainer


def _supervised_tokens(dataset: Any, stage: str) -> int:
    """Tokens the trainer counts per epoch: both sides of a pair, or the KTO samples."""
    if stage == "kto":
        return dataset.supervised_tokens()
    return dataset.supervised_tokens("chosen_labels") + dataset.supervised_tokens("rejected_labels")


def train_preference(cfg: Config) -> TrainResult:
    """Run one rm, dpo or kto training from a validated config."""
    from transformers import EarlyStoppingCallback

    from tunesmith.data.collate_pref import PairwiseCollator
    from tunesmith.train_callbacks import training_callbacks
    from tunesmith.training.preference import PlotPreferenceCallback
    from tunesmith.training.reward import RewardTrainer, ValueHeadModel, hidden_size_of
    from tunesmith.training.run_steps import finish_run, start_run

    stage, f = cfg.finetuning.stage, cfg.finetuning
    if cfg.data.packing:
        raise TunesmithError(
            f"packing: stage {stage} compares whole sequences and cannot pack them; set packing: false"
        )
    if f.pissa_init and f.finetuning_type == "lora":
        # PiSSA rewrites the base weights: the adapter-disabled policy would be no reference at all
        raise TunesmithError(
            f"pissa_init: stage {stage} needs the unmodified base model; set pissa_init: false"
        )
    run = start_run(cfg, stage)
    args, tokenizer, data, tuned = run.args, run.tokenizer, run.data, run.tuned
    lm = tuned.model
    per_epoch = _supervised_tokens(data.prepared.train, stage)
    bundle = training_callbacks(
        plot_loss=cfg.training.plot_loss,
        total_tokens=None if args.max_steps > 0 else int(per_epoch * args.num_train_epochs),
        progress_bar=args.disable_tqdm,
        # a hinge loss is exactly 0 once every margin is met: that is success, not a masked batch
        zero_loss_patience=10**9 if f.pref_loss == "hinge" and stage == "dpo" else 3,
    )
    multiple = 8 if run.precision["bf16"] or run.precision["fp16"] else 1
    common: dict[str, Any] = {
        "args": args,
        "processing_class": tokenizer,
        "callbacks_bundle": bundle,
        "loraplus_lr_ratio": f.loraplus_lr_ratio,
        "stochastic_rounding": f.pure_bf16 and f.stochastic_rounding,
        "loss_compile_backend": compile_backend(cfg.training.hf),
    }
    if stage == "rm":
        collator = PairwiseCollator(tokenizer.pad_token_id, multiple)
        model = ValueHeadModel(lm, hidden_size_of(lm), seed=cfg.training.seed)
        trainer: Any = RewardTrainer(
            model=model, train_dataset=data.train, eval_dataset=data.eval, data_collator=collator, **common
        )
    else:
        trainer = _preference_trainer(cfg, tuned, tokenizer, run.dtype, data, multiple, common)
    if cfg.training.plot_loss:
        trainer.add_callback(PlotPreferenceCallback())
    if f.early_stopping_steps:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=f.early_stopping_steps))

    out = run.out
    metrics = finish_run(run, trainer, lm=lm)
    if cfg.training.do_predict and stage == "rm" and run.is_main:
        from tunesmith.infer.predict import predict_after_training

        del trainer, run, tuned, lm  # free the training model: scoring loads the one just saved
        predict_after_training(cfg, out)  # chosen/rejected scores of the eval (else training) pairs
    return TrainResult(out, metrics)
