"""Reward model: a causal LM with a value head (linear hidden -> 1) scoring the last non-pad token.

Saved as the LM (full weights, or the LoRA adapter) plus ``value_head.safetensors`` beside it, with TRL's /
LLaMA-Factory's key names (``v_head.summary.weight``/``bias``). `load_reward_model(path)` loads it back for
scoring; checkpoints use the same layout, so resuming and load_best_model_at_end work too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.training.pref_losses import pair_metrics, pairwise_reward_loss
from tunesmith.training.preference import MetricStore, MetricsTrainer, reduce_means

VALUE_HEAD_FILE = "value_head.safetensors"
_WEIGHT, _BIAS = "v_head.summary.weight", "v_head.summary.bias"


class ValueHeadModel(nn.Module):
    """`lm` (a causal LM, possibly peft-wrapped) + a float32 linear value head on its last hidden state."""

    def __init__(self, lm: Any, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        with torch.random.fork_rng(devices=[]):  # the head's init never shifts the caller's random stream
            torch.manual_seed(seed)
            self.v_head = nn.Linear(hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """One score per sequence: the value of its last non-pad token (right padding)."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,  # the vocabulary projection is not needed: skip it for all but one position
        )
        hidden = out.hidden_states[-1]
        last = attention_mask.sum(-1) - 1
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.v_head(picked.to(self.v_head.weight.dtype)).squeeze(-1)

    def value_head_state(self) -> dict[str, torch.Tensor]:
        return {
            _WEIGHT: self.v_head.weight.detach().cpu().contiguous(),
            _BIAS: self.v_head.bias.detach().cpu().contiguous(),
        }

    def load_value_head(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / VALUE_HEAD_FILE
        if not path.is_file():
            raise TunesmithError(f"{path} is missing: {folder} is not a tunesmith reward model (stage: rm)")
        state = load_file(str(path))
        with torch.no_grad():
            self.v_head.weight.copy_(state[_WEIGHT])
            self.v_head.bias.copy_(state[_BIAS])


def hidden_size_of(lm: Any) -> int:
    return lm.get_input_embeddings().weight.shape[1]


class RewardTrainer(MetricsTrainer):
    """Pairwise (Bradley-Terry) reward-model training on chosen/rejected batches (chosen rows first)."""

    loss_is_scaled_for_ga = False  # the loss is a mean over pairs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = MetricStore()

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        loss = pairwise_reward_loss(chosen, rejected).mean()
        metrics = pair_metrics(chosen, rejected)
        self.metrics.add("train" if model.training else "eval", reduce_means(self.accelerator, metrics))
        return (loss, {"scores": scores}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        out = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_reward_model(self.accelerator.unwrap_model(self.model), out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_reward_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_reward_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def save_reward_model(model: ValueHeadModel, folder: str | Path) -> None:
    """The LM (or its adapter) with save_pretrained, and value_head.safetensors beside it."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model.lm.save_pretrained(str(folder))
    save_file(model.value_head_state(), str(Path(folder) / VALUE_HEAD_FILE), metadata={"format": "pt"})


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def load_reward_weights(model: ValueHeadModel, folder: str | Path) -> None:
    """Load saved weights (adapter or full LM, and the value head) into an existing reward model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if _is_adapter(folder):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.lm, load_file(str(folder / "adapter_model.safetensors")))
    elif (folder / "model.safetensors.index.json").is_file():
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model.lm, str(folder))
    else:
        result = model.lm.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if result.unexpected_keys:
            raise TunesmithError(f"{folder}: weights of another model: {result.unexpected_keys[:3]}")
    model.load_value_head(folder)


@dataclass
class RewardScorer:
    """A loaded reward model: `scorer(input_ids, attention_mask)` -> one float32 score per sequence."""

    model: ValueHeadModel

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.model.v_head.weight.device
        return self.model(input_ids.to(device), attention_mask.to(device)).float()


def load_reward_model(path: str | Path, *, dtype: str = "auto", device: str | None = None) -> RewardScorer:
    """Load a reward model saved by stage rm (full or LoRA) for scoring right-padded token batches."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.loader import resolve_dtype

    folder = Path(path)
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(
            f"{folder / VALUE_HEAD_FILE} is missing: {folder} is not a reward model (stage: rm)"
        )
    torch_dtype = resolve_dtype(dtype, cuda=torch.cuda.is_available())
    if _is_adapter(folder):
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        lm = PeftModel.from_pretrained(lm, str(folder)).merge_and_unload()
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    model = ValueHeadModel(lm, hidden_size_of(lm))
    model.load_value_head(folder)
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return RewardScorer(model)
