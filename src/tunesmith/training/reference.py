"""The reference model of DPO/KTO: where its log-probs come from, and computing them once before training.

Kinds:
- ``none``: reference-free losses (orpo, simpo): nothing is loaded;
- ``adapter``: LoRA without ``ref_model``: the policy with its adapter disabled (peft ``disable_adapter``),
  no second copy of the weights;
- ``model``: a separate frozen model (``ref_model``, or a frozen copy of the initial policy for full/freeze
  tuning; with ``pref_precompute_ref`` the initial policy itself, used before its first update);
- ``precomputed``: every row carries its reference log-probs (``pref_precompute_ref``), computed once and
  cached beside the tokenized data, keyed by the data, the reference's files and the dtype.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tunesmith.data.cache import DataCache, key_of

log = logging.getLogger("tunesmith")

RefKind = Literal["none", "adapter", "model", "precomputed"]
# model, batch -> per-row reference values (1-D tensors of the batch's row count)
RefColumns = Callable[[Any, dict[str, Any]], dict[str, torch.Tensor]]


@dataclass
class Reference:
    """Where reference log-probs come from (see the module docstring)."""

    kind: RefKind
    model: Any = None  # the frozen model of kind "model"

    @contextmanager
    def model_for(self, policy: Any) -> Iterator[Any]:
        """The module to run for reference log-probs; `policy` is the unwrapped (peft) policy."""
        if self.kind == "adapter":
            with policy.disable_adapter():
                yield policy
        elif self.kind == "model":
            yield self.model
        else:
            raise AssertionError(f"a {self.kind!r} reference has no model to run")


def frozen(model: Any) -> Any:
    """`model` with no trainable parameters, in eval mode."""
    model.requires_grad_(False)
    return model.eval()


def reference_for(
    cfg: Any, policy: Any, tokenizer: Any, dtype: str, *, device: Any = None, copy_policy: bool = True
) -> Reference:
    """ref_model (with its adapters merged), the adapter-disabled policy for LoRA, or the initial policy:
    a frozen copy, or the policy itself when ``copy_policy`` is off (it is read before its first update)."""
    f, m = cfg.finetuning, cfg.model
    if f.ref_model:
        model = load_reference_model(
            f.ref_model,
            f.ref_model_adapters,
            dtype=dtype,
            attn=m.flash_attn,
            trust_remote_code=m.trust_remote_code,
            tokenizer=tokenizer,
        )
    elif f.finetuning_type == "lora":
        return Reference("adapter")
    else:
        model = frozen_copy(policy) if copy_policy else policy
    return Reference("model", model if device is None else model.to(device))


def frozen_copy(model: Any) -> Any:
    """A frozen deep copy of the initial policy (full/freeze tuning without ref_model)."""
    return frozen(copy.deepcopy(model))


def load_reference_model(
    path: str, adapters: Sequence[str], *, dtype: str, attn: str, trust_remote_code: bool, tokenizer: Any
) -> Any:
    """Load `ref_model` (its adapters merged in), frozen."""
    from tunesmith.model.loader import load_model

    model = load_model(
        path,
        dtype=dtype,
        attn=attn,
        gradient_checkpointing=False,
        trust_remote_code=trust_remote_code,
        tokenizer=tokenizer,
    ).model
    if adapters:
        from peft import PeftModel

        for adapter in adapters:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    log.info("reference model: %s%s", path, f" + adapters {', '.join(adapters)}" if adapters else "")
    return frozen(model)


def files_fingerprint(paths: Sequence[str | None]) -> list[Any]:
    """Names, sizes and modification times of the files of each folder (a hub id stands for itself)."""
    out: list[Any] = []
    for p in paths:
        folder = Path(p) if p else None
        if folder is not None and folder.is_dir():
            out.append(
                [
                    (f.name, f.stat().st_size, f.stat().st_mtime_ns)
                    for f in sorted(folder.iterdir())
                    if f.is_file()
                ]
            )
        else:
            out.append(p)
    return out


def _to(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def reference_columns(
    reference: Reference,
    policy: Any,
    dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    compute: RefColumns,
    *,
    batch_size: int,
    device: Any,
) -> dict[str, np.ndarray]:
    """Reference values of every row of `dataset`, in order (eval mode: no dropout)."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    was_training = policy.training
    policy.eval()
    try:
        with reference.model_for(policy) as ref:
            for start in range(0, len(dataset), batch_size):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                for name, values in compute(ref, _to(collator(rows), device)).items():
                    out[name].append(values.float().cpu().numpy())
    finally:
        policy.train(was_training)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def cached_reference_columns(
    cache_dir: str, key: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """`compute()`'s columns, read from the data cache when this exact key was computed before."""
    cache = DataCache(cache_dir)
    digest = key_of(dict(key))
    hit = cache.get("reference", digest)
    if hit is not None:
        log.info("reusing reference log-probs from cache %s", hit)
        with np.load(hit / "columns.npz") as f:
            return {name: f[name] for name in f.files}
    columns = compute()
    staging = cache.staging("reference")
    np.savez(staging / "columns.npz", **columns)
    cache.commit(staging, "reference", digest, {"key": dict(key)})
    return columns
