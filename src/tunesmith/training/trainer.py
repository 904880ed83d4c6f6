"""The one HF Trainer subclass: token counting + loss watchdog per step, fused or weighted loss, LoRA+ groups,
pure_bf16's stochastic-rounding AdamW, and micro-batches replayed as CUDA graphs where the step allows
(`step_graphs`; `graph_obstacles` says why not).

Loss normalisation: transformers' Trainer counts the supervised tokens of the whole gradient-accumulation
window (`num_items_in_batch`) and the summed token losses are divided by it, so the loss is a mean over
supervised tokens of the window, whatever the micro-batch / accumulation split
(tests/training/test_invariants.py proves 8x1 == 1x8).

The loss is computed by default without materialising the logits (`training.fused_ce`); the plain path
(the model's own loss, or `weighted_causal_lm_loss` on its logits) stays for what the fused one cannot do,
and the reason is logged once. Token counts and the watchdog's loss checks stay on the device until a
logging step, so tunesmith's bookkeeping does not sync per micro-batch, and on a GPU a log event is read a
step later (`late_logs`), so logging every step does not stall the GPU either; the fused loss takes its
supervised rows (a data-dependent shape) from the collator (`loss_rows`, found on the CPU), and batches are
copied to the GPU without blocking (`causal_lm.data_loading`), so tunesmith adds no host sync to a step outside
logging. Transformers' mask creation still reads one value back per forward: with position ids and no padding
mask (packed rows, varlen's one row) `find_packed_sequence_indices` tests its result with `.all()`, and the
padded path's causal-skip check does the same. A replayed step runs none of that Python, so it reads nothing
back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import nested_gather

from tunesmith.data.collate import (
    IGNORE_INDEX,
    LOSS_ROW_WEIGHTS,
    LOSS_ROWS,
    CausalLMCollator,
    likely_widths,
    width_rows,
)
from tunesmith.errors import TunesmithError
from tunesmith.model.tuning import build_optimizer_param_groups
from tunesmith.train_callbacks import TrainCallbacks
from tunesmith.train_log import count_trained_tokens
from tunesmith.training.fused_head import FusedHead, probe_fused_head
from tunesmith.training.late_logs import Delivered, LateLogs
from tunesmith.training.late_logs import supported as late_logs_supported
from tunesmith.training.listed_zero_grad import listed_zero_grad
from tunesmith.training.lora_casting import inputs_uncast, layers_to_uncast
from tunesmith.training.step_graphs import CudaCapturer, StepGraphs

logger = logging.getLogger("tunesmith.train")


STOCHASTIC_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # optim names StochasticAdamW replaces


class TunesmithTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        callbacks_bundle: TrainCallbacks,
        loraplus_lr_ratio: float | None = None,
        fused_loss: bool = True,
        stochastic_rounding: bool = False,
        loss_compile_backend: str | None = None,
        cuda_graphs: bool | None = False,
        deferred_logging: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, callbacks=callbacks_bundle.as_list(), **kwargs)
        self.bundle = callbacks_bundle
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.stochastic_rounding = stochastic_rounding
        self.fused_loss = fused_loss
        # torch_compile's backend for the fused head's chunk math (None: eager)
        self.loss_compile_backend = loss_compile_backend
        self._fused: FusedHead | str | None = None  # decided at the first batch: the head, or why not
        self._non_embedding_params: int | None = None  # for floating_point_ops, counted once
        self._trained_params: list[torch.nn.Parameter] | None = None  # for _clip_grad_norm, listed once
        self._uncast_layers: list[Any] | None = None  # LoRA layers fed in the compute dtype (lora_casting)
        # None: where the step allows (step_graphs); the sft/pt stage passes what the config and launch allow
        self.cuda_graphs = cuda_graphs
        self._graphs: StepGraphs | str | None = None  # decided at the second micro-batch: graphs, or why not
        # the training batches' collator when it differs from data_collator's (static shapes for CUDA graphs)
        self.train_collator: Any = None
        self._captured_ahead = False  # the likely batch widths' graphs, captured at the first replayed step
        # log events read a step late on a GPU (`late_logs`); not for trainers whose log() adds metrics kept
        # since the last record (they would take the next step's)
        self.deferred_logging = deferred_logging and type(self).log is TunesmithTrainer.log
        self._late: LateLogs | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """HF's training, with the model's zero_grad over its parameters listed once (`listed_zero_grad`);
        not under FSDP or DeepSpeed, which replace the parameters when they wrap the model."""
        engine = self.is_fsdp_enabled or self.is_deepspeed_enabled
        self._late = None
        if self.deferred_logging and late_logs_supported(self.args.device):
            self._late = LateLogs(self.bundle.late_reads(), self.args.device)
        try:
            with listed_zero_grad(None if engine else self.model):
                result = super().train(*args, **kwargs)
        except BaseException:  # an interrupted or failed run still writes the records it staged
            with suppress(Exception):  # not over the error that stopped the run
                self._write_late_logs()
            raise
        self._write_late_logs()  # a run that ended without HF's stop signal
        return result

    def _write_late_logs(self, keep_latest: bool = False, start_time: float | None = None) -> None:
        """The staged log events (all, or all but the newest), read and logged at their own step (`late_logs`)."""
        if self._late is None:
            return
        for d in self._late.deliver(keep_latest):
            self._total_loss_scalar += d.loss_sum
            with _state_as_of(self.state, d):
                self.log(d.logs, start_time)

    def _maybe_log_save_evaluate(
        self, tr_loss: torch.Tensor, grad_norm: Any, model: Any, trial: Any, epoch: float,
        ignore_keys_for_eval: Any, start_time: float, learning_rate: float | None = None,
    ) -> None:  # fmt: skip
        """HF's, with a log event staged here and written at the next call, one step later whatever
        logging_steps is (`late_logs`); a call that evaluates, saves or ends training writes every staged one
        at once, so records keep their order."""
        late, state, control = self._late, self.state, self.control
        staged = late is not None and control.should_log and state.global_step > self._globalstep_last_logged
        if staged:
            late.stage(
                step=state.global_step,
                epoch=state.epoch,
                input_tokens=state.num_input_tokens_seen,
                steps=state.global_step - self._globalstep_last_logged,
                learning_rate=self._get_learning_rate() if learning_rate is None else learning_rate,
                loss_sum=nested_gather(tr_loss, self.args.parallel_mode).mean(),  # a new tensor
                grad_norm=grad_norm,
            )
            tr_loss -= tr_loss
            self._globalstep_last_logged = state.global_step  # HF's own logging below skips this step
        if late is not None and late.pending:  # the next call writes what this one staged (steps in between)
            final = control.should_evaluate or control.should_save or control.should_training_stop
            keep = staged and not final and state.global_step < state.max_steps
            self._write_late_logs(keep_latest=keep, start_time=start_time)
        super()._maybe_log_save_evaluate(
            tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
        )

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        tokens = count_trained_tokens(inputs["labels"])
        if self._uncast_layers is None:
            self._uncast_layers = self._layers_to_uncast(model)
        graphs = self._step_graphs(model)
        if graphs is not None and LOSS_ROW_WEIGHTS in inputs:
            if not model.training:  # HF's step sets them, and a replay runs none of HF's Python
                model.train()
            if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers
                self.optimizer.train()
            # without a token count HF divides the loss by the window's micro-batches (captured)
            extra = (self.current_gradient_accumulation_steps,) if num_items_in_batch is None else ()
            # the LoRA layers are uncast where the step runs its Python (an eager run, a capture), not around a
            # replay, which runs none: 2 x 168 module attribute writes a step less on the host
            step = partial(self._uncast_step, model)
            if not self._captured_ahead:
                self._captured_ahead = True
                self._capture_ahead(graphs, step, inputs, num_items_in_batch, extra)
            loss = graphs.step(step, inputs, num_items_in_batch, extra)
        else:
            loss = self._uncast_step(model, inputs, num_items_in_batch)
        self.bundle.add_tokens(tokens)
        self.bundle.watchdog.check(self.state.global_step + 1, loss, inputs)
        return loss

    def _uncast_step(self, model: Any, inputs: dict[str, Any], num_items: Any = None) -> torch.Tensor:
        """HF's training step with the run's LoRA layers reading their input uncast (`lora_casting`)."""
        with inputs_uncast(self._uncast_layers):
            return super().training_step(model, inputs, num_items)

    def get_train_dataloader(self) -> Any:
        """HF's, built with `train_collator` when one is set: evaluation and prediction batches keep
        `data_collator`'s own shapes (they are never replayed, so grid padding would only cost)."""
        if self.train_collator is None:
            return super().get_train_dataloader()
        plain, self.data_collator = self.data_collator, self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = plain

    def _step_graphs(self, model: Any) -> StepGraphs | None:
        """The run's CUDA graphs, decided once the first micro-batch ran eagerly (it settles the loss head)."""
        if self._graphs is None and self._fused is not None:
            obstacles = graph_obstacles(self, model)
            if not obstacles:
                trained = [p for p in model.parameters() if p.requires_grad]
                # compiled layers may compile for a new shape: that must happen before the capture
                self._graphs = StepGraphs(
                    trained,
                    CudaCapturer(),
                    warm_up_every_shape=bool(self.loss_compile_backend),
                    required=self.cuda_graphs is True,
                )
            elif self.cuda_graphs:
                raise graphs_required_error(obstacles)
            else:
                self._graphs = "; ".join(obstacles)
                if self.cuda_graphs is None and torch.cuda.is_available():
                    logger.info("cuda graphs: off (%s)", self._graphs)
        return self._graphs if isinstance(self._graphs, StepGraphs) else None

    def _capture_ahead(
        self, graphs: StepGraphs, step: Any, inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...]
    ) -> None:
        """Capture now the graphs of the batch widths this run's batches will likely have (`likely_widths`,
        from the data's row lengths), as inference servers capture theirs at start: a step that brings a
        new width otherwise captures it there, at about the cost of an eager step, all through the run's
        first hundred steps. Unpacked rows only (a packed batch's width hardly varies; its document count
        does). The batches captured here are made of one token (`width_rows`) and are never trained on."""
        try:
            self._capture_widths_ahead(graphs, step, inputs, num_items, extra)
        except TunesmithError:  # cuda_graphs: true and a capture failed: the run stops, as for any capture
            raise
        except Exception as e:  # noqa: BLE001 - a speed-up only: batches of a new width are captured as they come
            logger.warning("cuda graphs: capturing batch widths ahead failed (%s: %s); widths are captured as "
                           "batches bring them", type(e).__name__, e)  # fmt: skip

    def _capture_widths_ahead(
        self, graphs: StepGraphs, step: Any, inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...]
    ) -> None:
        collator, data = self.train_collator, self.train_dataset
        if not isinstance(collator, CausalLMCollator) or not hasattr(data, "lengths") or not len(data):
            return
        if "position_ids" in data[0]:
            return
        rows = min(self._train_batch_size, len(data))
        left = self.state.max_steps - self.state.global_step  # the run's steps still to come
        batches = left * self.args.gradient_accumulation_steps if self.state.max_steps else None
        widths = likely_widths(data.lengths(), rows, collator.pad_to_multiple_of, batches=batches)
        own = inputs["input_ids"].shape[-1]
        weights = "loss_weights" in inputs
        t0, done = time.perf_counter(), 0
        for width in widths:
            if width == own:
                continue
            batch = self._prepare_inputs(collator(width_rows(width, rows, collator.pad_token_id, weights)))
            if not graphs.prepare(step, batch, num_items, extra):
                return  # graphs went off (logged) or are full
            done += 1
        if done:
            logger.info(
                "cuda graphs: %d batch widths captured ahead (%d to %d tokens: the widths that batches of %d "
                "rows drawn at random from this data take, those expected at least once in the run) in %.1f s; "
                "a batch of another width is captured when it comes",
                done, widths[0], widths[-1], rows, time.perf_counter() - t0,
            )  # fmt: skip

    def _layers_to_uncast(self, model: Any) -> list[Any]:
        """lora_casting.layers_to_uncast for this run (a DDP wrapper's modules() reaches the model's)."""
        return layers_to_uncast(
            model,
            autocast=self.args.bf16 or self.args.fp16,
            engine=self.is_deepspeed_enabled or self.is_fsdp_enabled,
        )

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """HF's estimate, 6 x non-embedding parameters x input tokens, with the parameters counted once.

        HF recounts every parameter of the model at each micro-batch (about 20 ms of host time per step
        for a 24-layer LoRA model on a 2-core host), a cost a host-bound GPU step pays in full.
        """
        model = self.model
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters"):
            return 0
        if self._non_embedding_params is None:
            self._non_embedding_params = model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_params

    def _clip_grad_norm(self, model: Any) -> Any:
        """HF's clipping over the trained parameters only, listed once.

        HF hands accelerate `model.parameters()`, a walk over every module and parameter of the model
        (the frozen base of a LoRA run included) each optimizer step; frozen weights have no gradient and
        add nothing to the norm. FSDP, DeepSpeed and tensor-parallel (DTensor) models keep HF's path,
        which matches parameters to their sharded model or mesh.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or self.args.max_grad_norm is None:
            return super()._clip_grad_norm(model)
        if self._trained_params is None:
            trained = [p for p in model.parameters() if p.requires_grad]
            if any(type(p.data).__name__ == "DTensor" for p in trained):
                return super()._clip_grad_norm(model)
            self._trained_params = trained
        return self.accelerator.clip_grad_norm_(self._trained_params, self.args.max_grad_norm)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Mean next-token loss; fused unless turned off, unsupported, or logits are needed for metrics.

        With the fused loss the returned outputs carry empty logits ([batch, 0, vocab]).
        """
        rows = inputs.pop(LOSS_ROWS, None)  # never model inputs
        row_weights = inputs.pop(LOSS_ROW_WEIGHTS, None)
        needs_logits = return_outputs and (
            self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None
        )
        fused = None if needs_logits or "labels" not in inputs else self._fused_head(model, inputs)
        weights = inputs.pop("loss_weights", None)
        if fused is None and weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        if fused is None:
            outputs = model(**inputs)
            loss = weighted_causal_lm_loss(outputs.logits, labels, weights, num_items_in_batch)
        else:
            total, count, outputs = fused.loss_sum(model, inputs, labels, weights, rows, row_weights)
            denom = num_items_in_batch if num_items_in_batch is not None else count
            loss = total / (denom.to(total.device) if isinstance(denom, torch.Tensor) else denom)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every rank and DDP averages gradients over ranks, so
            # scale back up, as Trainer.compute_loss does for the model's own loss.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def _fused_head(self, model: Any, inputs: dict[str, Any]) -> FusedHead | None:
        """The fused head, decided (and logged) once, at the first batch."""
        if self._fused is None:
            self._fused = self._decide_fused(model, inputs)
            if isinstance(self._fused, FusedHead):
                logger.info("loss: fused lm_head + cross-entropy (%s)", self._fused.describe())
            else:
                logger.info("loss: plain logits path (fused loss off: %s)", self._fused)
        return self._fused if isinstance(self._fused, FusedHead) else None

    def _decide_fused(self, model: Any, inputs: dict[str, Any]) -> FusedHead | str:
        if not self.fused_loss:
            return "turned off (fused_loss=False)"
        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            return "FSDP / DeepSpeed ZeRO-3 shard the head weight, which only its own forward gathers"
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return "label_smoothing_factor or a custom compute_loss_func is set"
        probe = {k: v for k, v in inputs.items() if k not in ("labels", "loss_weights")}
        # the run's mixed precision (compute_dtype runs an fp32 head in bf16, never in fp16)
        mixed = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        return probe_fused_head(
            self.accelerator.unwrap_model(model),
            probe,
            mixed=mixed,
            compile_backend=self.loss_compile_backend,
        )

    def create_optimizer(self, model: Any = None) -> Any:
        stochastic = self.optimizer is None and self._stochastic_rounding()
        if self.optimizer is not None or not (self.loraplus_lr_ratio or stochastic):
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        a = self.args
        groups = build_optimizer_param_groups(
            self.model, a.learning_rate, self.loraplus_lr_ratio, a.weight_decay
        )
        if stochastic:
            from tunesmith.training.stochastic_adamw import StochasticAdamW

            self.optimizer = StochasticAdamW(
                groups,
                lr=a.learning_rate,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
                seed=a.seed,
            )
            logger.info(
                "optimizer: AdamW with stochastic rounding of the bf16 weights and moments (pure_bf16)"
            )
            return self.optimizer
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(a, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=a.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _stochastic_rounding(self) -> bool:
        """Whether pure_bf16's bf16 weights get `StochasticAdamW`: asked for, some trained weight is bf16, the
        optimizer is torch's AdamW, and no DeepSpeed/FSDP (which keep fp32 master weights of their own)."""
        if not self.stochastic_rounding:
            return False
        trained = [p for p in self.model.parameters() if p.requires_grad]
        if (
            not any(p.dtype == torch.bfloat16 for p in trained)
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            return False
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim not in STOCHASTIC_OPTIMS:
            logger.warning("optimizer: %s updates the bf16 weights of pure_bf16 rounded to nearest: updates below "
                        "bf16's resolution are lost. Fix: optim adamw_torch_fused (stochastic rounding), or "
                        "pure_bf16 false (fp32 weights)", optim)  # fmt: skip
            return False
        return True


@contextmanager
def _state_as_of(state: Any, event: Delivered) -> Iterator[None]:
    """The trainer state at a late log event's step, for HF's log() and the callbacks' on_log."""
    now = state.global_step, state.epoch, state.num_input_tokens_seen
    state.global_step, state.epoch, state.num_input_tokens_seen = event.step, event.epoch, event.input_tokens
    try:
        yield
    finally:
        state.global_step, state.epoch, state.num_input_tokens_seen = now


def graph_obstacles(trainer: TunesmithTrainer, model: Any) -> list[str]:
    """Why this run's micro-batch step cannot be replayed as a CUDA graph (empty: it can), from what the
    running trainer and model show. What the config alone rules out (DeepSpeed, LOMO, tiled MLPs, ...) the
    sft/pt stage checks first (`config_checks.cuda_graph_obstacles`) and passes as cuda_graphs=False."""
    a = trainer.args
    collator = trainer.data_collator
    found = {
        "cuda_graphs: false": trainer.cuda_graphs is False,
        "batches without document boundaries (flash_attn: varlen makes them)": not (
            isinstance(collator, CausalLMCollator) and collator.boundaries
        ),
        "no CUDA GPU": not torch.cuda.is_available() or a.device.type != "cuda",
        "several processes or GPUs (gradients are all-reduced outside a captured step)": a.world_size > 1
        or a.n_gpu > 1,
        # fp16 may be tunesmith's own choice (dtype auto on a GPU without bf16), not the config's
        "fp16 (its loss scaler reads the gradients on the host)": a.fp16,
        # before the first batch the head is undecided: only turning it off counts
        "the plain loss path (only the fused loss head is captured)": not trainer.fused_loss
        or trainer.label_smoother is not None
        or trainer.compute_loss_func is not None
        or (trainer._fused is not None and not isinstance(trainer._fused, FusedHead)),
        "gradient checkpointing": _checkpointing(model),
        "a quantized model": getattr(getattr(model, "config", None), "quantization_config", None) is not None,
        "a mixture-of-experts model (its routing has data-dependent shapes)": _experts(model),
        # the sft/pt stage runs on one from loading the model on (step_graphs.training_stream)
        "the training does not run on a side CUDA stream": torch.cuda.is_available()
        and torch.cuda.current_stream() == torch.cuda.default_stream(),
    }
    return [what for what, on in found.items() if on]


def _experts(model: Any) -> bool:
    """Whether the model routes tokens to experts (its config names more than one)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return any(
        (getattr(text, k, None) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts")
    )


def _checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on (transformers renamed the property; the old name warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(model, name):
            return bool(getattr(model, name))
    return False


def graphs_required_error(obstacles: list[str]) -> TunesmithError:
    return TunesmithError(
        f"cuda_graphs: true, but this run's step cannot be captured: {'; '.join(obstacles)}. "
        "Fix: change what rules them out where you can (flash_attn: varlen; checkpointing turned on for memory "
        "cannot be combined with graphs), or leave cuda_graphs unset (graphs wherever the step allows them)"
    )


def weighted_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items_in_batch: Any = None
) -> torch.Tensor:
    """Per-token weighted next-token loss, normalised like the model's own loss (by supervised tokens)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    w = weights[:, 1:].to(logits.device)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    total = (per_token * w.reshape(-1)).sum()
    denom = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


__all__ = ["TunesmithTrainer", "graph_obstacles", "weighted_causal_lm_loss"]
