"""Config -> the pieces a training stage needs: tokenizer, template, tokenized data, tuned model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tunesmith.config import Config
from tunesmith.data.packing import pack, packed_rows
from tunesmith.data.pipeline import DataOptions, Prepared, prepare
from tunesmith.data.templates import resolve_template
from tunesmith.data.tokenized import TokenDataset
from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")


def data_options(cfg: Config, stage: str, *, show_progress: bool = True) -> DataOptions:
    d = cfg.data
    return DataOptions(
        dataset=d.dataset,
        eval_dataset=d.eval_dataset,
        dataset_dir=d.dataset_dir,
        stage=stage,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        val_size=d.val_size,
        seed=cfg.training.seed,
        mix_strategy=d.mix_strategy,
        interleave_probs=d.interleave_probs or None,
        num_workers=d.preprocessing_num_workers or 1,
        train_on_prompt=d.train_on_prompt,
        mask_history=d.mask_history,
        truncation=d.truncation,
        bad_rows=d.bad_rows,
        max_bad_row_share=d.max_bad_row_share,
        enable_thinking=d.enable_thinking,
        packing=bool(d.packing),
        cache_dir=d.data_cache_dir or "~/.cache/tunesmith",
        overwrite_cache=d.overwrite_cache,
        show_progress=show_progress,
        chunk_rows=d.preprocessing_batch_size,
    )


def template_for(cfg: Config, tokenizer: Any) -> Any:
    """The configured template (default `auto`: the tokenizer's own chat template), with `default_system`."""
    from dataclasses import replace

    from tunesmith.data.templates import AutoTemplate

    template = resolve_template(cfg.model.template or "auto", tokenizer)
    if cfg.data.default_system is not None:
        if isinstance(template, AutoTemplate):
            raise TunesmithError(
                "default_system needs a named template (template: auto renders the tokenizer's "
                "own system prompt); set template to a name, e.g. template: qwen"
            )
        template = replace(template, default_system=cfg.data.default_system)
    return template


def require_model(cfg: Config) -> str:
    if not cfg.model.model_name_or_path:
        raise TunesmithError(
            "model_name_or_path is not set: give a local folder or a hub id "
            "(e.g. model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct)"
        )
    return cfg.model.model_name_or_path


class PackedDataset:
    """Rows of a TokenDataset bin-packed to cutoff_len; each item concatenates whole documents."""

    def __init__(self, base: TokenDataset, capacity: int) -> None:
        self.base = base
        self.bins = pack(base.lengths().tolist(), capacity)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, Any]:
        items = [self.base[j] for j in self.bins[i]]
        cols = {k: [it[k] for it in items] for k in ("input_ids", "labels")}
        if any(it.get("weights") is not None for it in items):
            cols["weights"] = [
                it["weights"] if it.get("weights") is not None else [1.0] * len(it["input_ids"])
                for it in items
            ]
        row = packed_rows(cols, [list(range(len(items)))])
        return {k: v[0] for k, v in row.items() if k != "seq_lens"}

    def num_tokens(self) -> int:
        return self.base.num_tokens()


@dataclass
class DataBundle:
    prepared: Prepared
    train: Any
    eval: Any


def prepare_data(
    cfg: Config, tokenizer: Any, template: Any, kind: str, *, is_main: bool = True
) -> DataBundle:
    """Tokenize (or reuse the cache) and pack when asked; packing keeps documents apart."""
    prepared = prepare(data_options(cfg, kind, show_progress=is_main), tokenizer, template)
    if len(prepared.train) == 0:
        raise TunesmithError(
            "no training samples left after preprocessing; run `tunesmith check` on this "
            "config to see why (invalid rows, truncation, samples with no supervised tokens)"
        )
    train: Any = prepared.train
    ev: Any = prepared.eval
    if cfg.data.packing:
        train = PackedDataset(prepared.train, cfg.data.cutoff_len)
        log.info(
            "packing: %d samples -> %d rows of up to %d tokens",
            len(prepared.train),
            len(train),
            cfg.data.cutoff_len,
        )
    return DataBundle(prepared, train, ev)
