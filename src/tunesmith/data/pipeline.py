"""Config -> tokenized train/eval datasets: resolve, convert, mix, split, tokenize (workers), cache.

Everything that affects tokens is part of the cache key (data content, tokenizer, template, cutoff,
masking policy, stage, the data package's code) and nothing else, so a second run reuses the result
and says so.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from tunesmith.data import preprocess as pp
from tunesmith.data.cache import DataCache, code_digest, key_of, tokenizer_digest
from tunesmith.data.convert import Converted, RowStore, convert
from tunesmith.data.fast_bpe import fast_bpe_for
from tunesmith.data.load import BadRowPolicy
from tunesmith.data.mix import dataset_indices, mix_plan, split_indices
from tunesmith.data.registry import resolve_dataset
from tunesmith.data.tokenized import TokenDataset, write_part
from tunesmith.errors import DataError

# Which preprocessing a stage needs: the stage table is data.
STAGE_KIND = {
    "pt": "pt",
    "sft": "sft",
    "rm": "pairwise",
    "dpo": "pairwise",
    "kto": "kto",
    "ppo": "prompt",
    "grpo": "prompt",
    "predict": "prompt",
}
FAST_MIN_ROWS = 2000
STAT_COLUMNS = ("prompt_tokens", "response_tokens", "total_tokens", "supervised_tokens", "truncated")


@dataclass(frozen=True)
class DataOptions:
    """What the pipeline needs from the config (see tunesmith.config for each key's meaning)."""

    dataset: tuple[str, ...]
    eval_dataset: tuple[str, ...] = ()
    dataset_dir: str = "data"
    stage: str = "sft"
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    seed: int = 42
    mix_strategy: str = "concat"
    interleave_probs: tuple[float, ...] | None = None
    num_workers: int = 1
    train_on_prompt: bool = False
    mask_history: bool = False
    truncation: str = "keep_response"
    bad_rows: str = "skip"
    max_bad_row_share: float = 0.5
    enable_thinking: bool | None = None
    packing: bool = False
    cache_dir: str = "~/.cache/tunesmith"
    overwrite_cache: bool = False
    show_progress: bool = True
    chunk_rows: int = 1000  # rows per worker task and per part file (preprocessing_batch_size)
    fast_tokenizer: bool = True  # byte-level BPE through its verified tiktoken twin (same ids; fast_bpe.py)


@dataclass
class SplitStats:
    """Per-row token statistics of one split (before truncation) and what happened to the rows."""

    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def percentiles(self, column: str, qs: tuple[int, ...] = (50, 90, 99, 100)) -> dict[str, int]:
        values = self.columns.get(column)
        if values is None or not len(values):
            return {}
        return {("max" if q == 100 else f"p{q}"): int(np.percentile(values, q, method="higher")) for q in qs}


@dataclass
class Prepared:
    train: TokenDataset
    eval: TokenDataset | None
    converted: list[Converted]
    train_stats: SplitStats
    eval_stats: SplitStats | None
    key: str
    reused: bool
    seconds: float


# ---- worker side -------------------------------------------------------------------------------
# A worker process holds its context in this module-level slot, set once by the pool initializer:
# passing the tokenizer with every chunk would cost more than the tokenization itself.
_WORKER: dict[str, Any] = {}


def _init_worker(ctx: dict[str, Any]) -> None:
    _WORKER.clear()
    _WORKER.update(ctx)
    _WORKER["stores"] = {}


def _rows_for(plan: np.ndarray) -> list[dict]:
    stores: dict[int, RowStore] = _WORKER["stores"]
    rows: list[dict] = [{}] * len(plan)
    for d in np.unique(plan[:, 0]):
        if d not in stores:
            stores[d] = RowStore(_WORKER["paths"][d])
        where = np.nonzero(plan[:, 0] == d)[0]
        for pos, row in zip(where, stores[d].get(plan[where, 1].tolist())):
            rows[pos] = row
    return rows


def _process_chunk(job: tuple[int, np.ndarray, str]) -> dict[str, Any]:
    chunk_id, plan, out_dir = job
    # Millions of small int objects and no reference cycles: the cyclic GC's passes only cost time (~8%).
    enabled = gc.isenabled()
    gc.disable()
    try:
        rows = _rows_for(plan)
        columns, stats = pp.run_kind(_WORKER["kind"], rows, **_WORKER["kwargs"])
        n = write_part(Path(out_dir) / f"part-{chunk_id:06d}.arrow", columns)
    finally:
        if enabled:
            gc.enable()
    return {"chunk": chunk_id, "rows_in": len(rows), "rows_out": n, "stats": stats}


# ---- parent side -------------------------------------------------------------------------------


def _plan(converted: list[Converted], specs: list, opts: DataOptions) -> np.ndarray:
    """(dataset, row) pairs in training order, before the validation split."""
    per = [
        np.asarray(
            dataset_indices(
                c.num_rows, num_samples=s.num_samples, max_samples=opts.max_samples, seed=opts.seed
            ),
            dtype=np.int64,
        )
        for c, s in zip(converted, specs)
    ]
    probs = list(opts.interleave_probs) if opts.interleave_probs else None
    pairs = mix_plan([len(p) for p in per], opts.mix_strategy, probs, opts.seed)
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    arr = np.asarray(pairs, dtype=np.int64)
    rows = np.empty_like(arr)
    rows[:, 0] = arr[:, 0]
    for d, p in enumerate(per):
        mask = arr[:, 0] == d
        rows[mask, 1] = p[arr[mask, 1]]
    return rows


def _tokenize_split(
    plan: np.ndarray,
    out_dir: Path,
    ctx: dict[str, Any],
    workers: int,
    desc: str,
    show_progress: bool,
    chunk: int,
) -> SplitStats:
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, plan[s : s + chunk], str(out_dir)) for i, s in enumerate(range(0, len(plan), chunk))]
    stats = SplitStats(rows_in=len(plan))
    collected: dict[str, list] = {c: [] for c in STAT_COLUMNS}
    bar = tqdm(
        total=len(plan),
        desc=desc,
        unit="rows",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    if workers > 1 and len(jobs) > 1:
        pool_ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with pool_ctx.Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
            results = pool.imap(_process_chunk, jobs)
            _collect(results, stats, collected, bar)
    else:
        _init_worker(ctx)
        _collect(map(_process_chunk, jobs), stats, collected, bar)
    bar.close()
    stats.columns = {k: np.asarray(v) for k, v in collected.items()}
    return stats


def _collect(results, stats: SplitStats, collected: dict[str, list], bar) -> None:
    for r in results:
        stats.rows_out += r["rows_out"]
        for k in STAT_COLUMNS:
            collected[k].extend(r["stats"].get(k, ()))
        stats.dropped.update(r["stats"].get("dropped", {}))
        bar.update(r["rows_in"])


def _save_stats(path: Path, stats: SplitStats) -> None:
    table = pa.table({k: pa.array(v) for k, v in stats.columns.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def _load_stats(path: Path, meta: dict[str, Any]) -> SplitStats:
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return SplitStats(
        meta["rows_in"],
        meta["rows_out"],
        Counter(meta["dropped"]),
        {k: table.column(k).to_numpy() for k in table.column_names},
    )


def _template_id(template: Any) -> str:
    return key_of({"template": repr(template)})


def prepare(opts: DataOptions, tokenizer: Any, template: Any) -> Prepared:
    """Turn the configured datasets into tokenized train (and eval) datasets, reusing the cache."""
    t0 = time.perf_counter()
    cache = DataCache(opts.cache_dir)
    policy = BadRowPolicy(mode=opts.bad_rows, max_share=opts.max_bad_row_share)
    kind = STAGE_KIND[opts.stage]

    def convert_all(names: tuple[str, ...]):
        specs = [resolve_dataset(n, opts.dataset_dir) for n in names]
        conv = [
            convert(
                s,
                dataset_dir=opts.dataset_dir,
                policy=policy,
                cache=cache,
                overwrite=opts.overwrite_cache,
                show_progress=opts.show_progress,
                require_response=kind != "prompt",
            )
            for s in specs
        ]
        return specs, conv

    specs, converted = convert_all(opts.dataset)
    eval_specs, eval_converted = convert_all(opts.eval_dataset) if opts.eval_dataset else ([], [])
    if opts.eval_dataset and opts.val_size:
        raise DataError(
            "config",
            "val_size and eval_dataset are both set",
            field="val_size",
            fix="use one of them: eval_dataset for a separate set, val_size to split the training data",
        )

    key = key_of(
        {
            "data": [c.key for c in converted],
            "eval": [c.key for c in eval_converted],
            "mix": [
                opts.mix_strategy,
                opts.interleave_probs,
                opts.max_samples,
                opts.seed,
                opts.val_size,
                [s.num_samples for s in specs + eval_specs],
            ],
            "kind": kind,
            "tokenizer": tokenizer_digest(tokenizer),
            "template": _template_id(template),
            "options": {
                k: v
                for k, v in asdict(opts).items()
                if k
                in (
                    "cutoff_len",
                    "train_on_prompt",
                    "mask_history",
                    "truncation",
                    "enable_thinking",
                    "packing",
                )
            },
            "code": code_digest(),
        }
    )
    hit = None if opts.overwrite_cache else cache.get("tokenized", key)
    if hit is not None:
        if opts.show_progress:
            print(f"tunesmith: reusing tokenized data from cache {hit}", file=sys.stderr)
        return _from_cache(hit, converted + eval_converted, key, t0)

    plan = _plan(converted, specs, opts)
    if opts.eval_dataset:
        eval_plan = _plan(eval_converted, eval_specs, opts)
        eval_plan[:, 0] += len(converted)
    elif opts.val_size:
        tr, va = split_indices(len(plan), opts.val_size, opts.seed)
        plan, eval_plan = plan[np.asarray(tr, dtype=np.int64)], plan[np.asarray(va, dtype=np.int64)]
    else:
        eval_plan = None

    rows_total = len(plan) + (0 if eval_plan is None else len(eval_plan))
    kwargs = pp.kind_kwargs(
        kind,
        tokenizer=tokenizer,
        template=template,
        cutoff_len=opts.cutoff_len,
        train_on_prompt=opts.train_on_prompt,
        mask_history=opts.mask_history,
        truncation=opts.truncation,
        enable_thinking=opts.enable_thinking,
        packing=opts.packing,
        # Building the tiktoken twin takes ~1 s for a 150k vocabulary: worth it from a few thousand rows.
        fast=fast_bpe_for(tokenizer) if opts.fast_tokenizer and rows_total >= FAST_MIN_ROWS else None,
    )
    staging = cache.staging("tokenized")
    ctx = {"kind": kind, "kwargs": kwargs, "paths": [str(c.path) for c in converted + eval_converted]}
    workers = max(1, opts.num_workers)
    train_stats = _tokenize_split(
        plan, staging / "train", ctx, workers, "tokenize train", opts.show_progress, opts.chunk_rows
    )
    eval_stats = None
    if eval_plan is not None:
        eval_stats = _tokenize_split(
            eval_plan, staging / "eval", ctx, workers, "tokenize eval", opts.show_progress, opts.chunk_rows
        )
    meta: dict[str, Any] = {}
    for split, st in (("train", train_stats), ("eval", eval_stats)):
        if st is not None:
            _save_stats(staging / f"{split}_stats.arrow", st)
            meta[split] = {"rows_in": st.rows_in, "rows_out": st.rows_out, "dropped": dict(st.dropped)}
    meta["datasets"] = [c.name for c in converted]
    final = cache.commit(staging, "tokenized", key, meta)
    return _from_cache(final, converted + eval_converted, key, t0, reused=False)


def _from_cache(path: Path, converted: list[Converted], key: str, t0: float, reused: bool = True) -> Prepared:
    import orjson

    meta = orjson.loads((path / "meta.json").read_bytes())
    train = TokenDataset(sorted((path / "train").glob("part-*.arrow")))
    train_stats = _load_stats(path / "train_stats.arrow", meta["train"])
    ev = ev_stats = None
    if "eval" in meta:
        ev = TokenDataset(sorted((path / "eval").glob("part-*.arrow")))
        ev_stats = _load_stats(path / "eval_stats.arrow", meta["eval"])
    return Prepared(train, ev, converted, train_stats, ev_stats, key, reused, time.perf_counter() - t0)
