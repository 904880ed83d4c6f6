"""A whole grpo / ppo run, top to bottom, on the machinery of causal_lm.py and pref_run.py.

config -> tokenizer + template -> prompt data (cached) -> policy (+ tuning; + value head for ppo) -> engine
around the policy -> reference (LoRA: the adapter-disabled policy; ref_model; else a frozen copy) -> reward
model or reward functions -> RLTrainer -> outputs (weights or adapter, value_head.safetensors for ppo,
tokenizer with chat template, generation_config, resolved config, run.json, trainer_log.jsonl with
reward/KL metrics, loss and reward plots).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import TunesmithError
from tunesmith.training.causal_lm import (
    TrainResult,
)
from tunesmith.training.reference import reference_for

log = logging.getLogger("tunesmith")


def _reward_model(cfg: Config, dtype: str, device: Any) -> Any:
    """The reward model of stage rm, with reward_model_adapters merged into its LM."""
    from tunesmith.training.reward import load_reward_model

    f = cfg.finetuning
    scorer = load_reward_model(f.reward_model, dtype=dtype, device=str(device))
    if f.reward_model_adapters:
        from peft import PeftModel

        for adapter in f.reward_model_adapters:
            scorer.model.lm = PeftModel.from_pretrained(scorer.model.lm, adapter).merge_and_unload()
        scorer.model.requires_grad_(False).eval()
    log.info("reward model: %s", f.reward_model)
    return scorer


def _reward_funcs(cfg: Config) -> list[Any]:
    from tunesmith.training.rewards import RewardOptions, build_reward_funcs

    f = cfg.finetuning
    options = RewardOptions(f.answer_column, f.reward_format_pattern, f.reward_length_target)
    funcs = build_reward_funcs(f.reward_funcs, f.reward_weights, options)
    log.info("reward functions: %s", ", ".join(f"{r.name} (x{r.weight:g})" for r in funcs))
    return funcs


def _algorithm(
    cfg: Config, lm: Any, tokenizer: Any, template: Any, dtype: str, device: Any
) -> tuple[Any, Any]:
    """(the module the trainer trains, the algorithm)."""
    from tunesmith.infer.hf_engine import HFEngine
    from tunesmith.infer.settings import SamplingSettings
    from tunesmith.training.grpo import GRPO
    from tunesmith.training.ppo import PPO, KLController, PolicyValueModel
    from tunesmith.training.reward import hidden_size_of

    f = cfg.finetuning
    engine = HFEngine.build(lm, tokenizer, template, name="policy")
    # special tokens stay in the text (e.g. <think> tags the format reward looks for)
    settings = SamplingSettings.from_config(cfg).with_overrides(skip_special_tokens=False)
    log.info(
        "rollouts: %s", settings.with_overrides(n=f.num_generations if f.stage == "grpo" else 1).describe()
    )
    if f.stage == "grpo":
        reference = reference_for(cfg, lm, tokenizer, dtype, device=device) if f.grpo_beta > 0 else None
        algorithm: Any = GRPO(
            engine, settings.with_overrides(n=f.num_generations), _reward_funcs(cfg), reference,
            epsilon=f.grpo_epsilon, beta=f.grpo_beta, keep_old_logps=f.grpo_iterations > 1,
            pad_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return lm, algorithm
    reference = reference_for(cfg, lm, tokenizer, dtype, device=device)
    model = PolicyValueModel(lm, hidden_size_of(lm), seed=cfg.training.seed)
    algorithm = PPO(
        engine, settings, reference, KLController(f.ppo_kl_coef, f.ppo_target),
        reward_model=_reward_model(cfg, dtype, device) if f.reward_model else None,
        reward_funcs=() if f.reward_model else _reward_funcs(cfg),
        score_norm=f.ppo_score_norm, whiten_rewards=f.ppo_whiten_rewards, pad_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return model, algorithm


def train_rl(cfg: Config) -> TrainResult:
    """Run one grpo or ppo training from a validated config."""
    from transformers import EarlyStoppingCallback
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from tunesmith.train_callbacks import training_callbacks
    from tunesmith.training.rl_trainer import PlotRewardCallback, RLTrainer
    from tunesmith.training.rollout import collate_prompts
    from tunesmith.training.run_steps import finish_run, start_run

    stage, f = cfg.finetuning.stage, cfg.finetuning
    if cfg.data.packing:
        raise TunesmithError(f"packing: stage {stage} trains on generated completions; set packing: false")
    if f.pissa_init and f.finetuning_type == "lora":
        raise TunesmithError(
            f"pissa_init: stage {stage} needs the unmodified base model as reference; set pissa_init: false"
        )

    def refuse_sharded(args: Any) -> None:
        if is_deepspeed_zero3_enabled() or args.fsdp:
            raise TunesmithError(
                f"stage {stage} generates with the policy's whole weights on each GPU, which DeepSpeed ZeRO-3 "
                "and FSDP shard. Fix: use deepspeed: zero2 or no engine (DDP)"
            )

    run = start_run(cfg, stage, check_args=refuse_sharded)
    args, tokenizer, data = run.args, run.tokenizer, run.data
    lm = run.tuned.model
    shipped_generation_config = copy.deepcopy(lm.generation_config)  # the engine blanks the model's own
    model, algorithm = _algorithm(cfg, lm, tokenizer, run.template, run.dtype, args.device)
    bundle = training_callbacks(
        plot_loss=cfg.training.plot_loss,
        total_tokens=None,  # completions are generated: the token count of a run is unknown up front
        progress_bar=args.disable_tqdm,
        # a policy-gradient loss is exactly 0 whenever every group's rewards tie (and no KL term)
        zero_loss_patience=10**9,
    )
    trainer = RLTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=collate_prompts,
        processing_class=tokenizer, callbacks_bundle=bundle, loraplus_lr_ratio=f.loraplus_lr_ratio,
        stochastic_rounding=f.pure_bf16 and f.stochastic_rounding,
        algorithm=algorithm, iterations=f.grpo_iterations if stage == "grpo" else f.ppo_epochs,
        with_value_head=stage == "ppo",
    )  # fmt: skip
    if cfg.training.plot_loss:
        trainer.add_callback(PlotRewardCallback())
    if f.early_stopping_steps:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=f.early_stopping_steps))

    def restore_generation_config() -> None:
        lm.generation_config = shipped_generation_config

    metrics = finish_run(run, trainer, lm=lm, before_save=restore_generation_config)
    return TrainResult(run.out, metrics)
