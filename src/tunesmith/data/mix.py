"""Index plans for mixing datasets, per-dataset sampling and the validation split.

Plans hold indices only (never rows), so mixing millions of rows costs a few arrays. Interleaving matches
Hugging Face ``datasets.interleave_datasets`` exactly for the same seed (first_exhausted / all_exhausted).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from tunesmith.errors import DataError

Strategy = Literal["concat", "interleave_under", "interleave_over"]
STRATEGIES: tuple[str, ...] = ("concat", "interleave_under", "interleave_over")


def mix_plan(
    sizes: list[int], strategy: Strategy = "concat", probs: list[float] | None = None, seed: int = 0
) -> list[tuple[int, int]]:
    """(dataset index, row index) pairs in training order.

    ``interleave_under`` stops as soon as one dataset is exhausted; ``interleave_over`` goes on, cycling the
    exhausted ones, until every dataset was seen in full. Without ``probs`` datasets take turns.
    Example: ``mix_plan([2, 3], "interleave_under")`` -> ``[(0, 0), (1, 0), (0, 1), (1, 1)]``.
    """
    if strategy not in STRATEGIES:
        raise DataError("data mix", f"unknown mix strategy {strategy!r}", field="mix_strategy",
                        expected=" | ".join(STRATEGIES))  # fmt: skip
    if any(n < 0 for n in sizes):
        raise ValueError(f"dataset sizes must be >= 0, got {sizes}")
    if strategy == "concat":
        if probs is not None:
            raise DataError("data mix", "interleave_probs only apply to interleave strategies", field="interleave_probs",
                            fix="set mix_strategy to interleave_under or interleave_over, or drop interleave_probs")  # fmt: skip
        return [(d, r) for d, n in enumerate(sizes) for r in range(n)]
    if not sizes:
        return []
    if any(n == 0 for n in sizes):
        raise DataError("data mix", f"cannot interleave an empty dataset (sizes {sizes})", field="dataset")
    over = strategy == "interleave_over"
    if probs is None:
        length = max(sizes) if over else min(sizes)
        return [(d, r % n) for r in range(length) for d, n in enumerate(sizes)]
    return _sampled(sizes, _check_probs(probs, len(sizes), over), seed, over)


def _check_probs(probs: list[float], count: int, over: bool) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if len(p) != count:
        raise DataError("data mix", f"{len(p)} interleave_probs for {count} datasets", field="interleave_probs",
                        expected="one probability per dataset")  # fmt: skip
    if (p < 0).any() or p.sum() <= 0:
        raise DataError("data mix", f"invalid probabilities {probs}", field="interleave_probs",
                        expected="non-negative numbers with a positive sum")  # fmt: skip
    if over and (p == 0).any():
        raise DataError("data mix", "a dataset with probability 0 is never exhausted", field="interleave_probs",
                        fix="give every dataset a positive probability, or use interleave_under")  # fmt: skip
    return p / p.sum()


def _sampled(sizes: list[int], p: np.ndarray, seed: int, over: bool) -> list[tuple[int, int]]:
    """Draw the source of each row in blocks of 1000, as HF datasets does, until one/every source is used up."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(sizes, dtype=np.int64)
    drawable = p > 0
    blocks, counts = [], np.zeros(len(sizes), dtype=np.int64)
    while True:
        reached = (counts >= lengths)[drawable]
        if reached.all() if over else reached.any():
            break
        block = rng.choice(len(sizes), size=1000, p=p)
        blocks.append(block)
        counts += np.bincount(block, minlength=len(sizes))
    draws = np.concatenate(blocks)
    # Each source is exhausted right after its length-th draw; keep draws up to the first (under) or last
    # (over) such moment.
    exhausted_at = [
        int(np.flatnonzero(draws == d)[n - 1]) for d, n in enumerate(sizes) if counts[d] >= n and drawable[d]
    ]
    used = draws[: (max(exhausted_at) if over else min(exhausted_at)) + 1]
    seen = np.zeros_like(used)
    for d in range(len(sizes)):  # the k-th draw of source d takes its row k (cycling when oversampling)
        mask = used == d
        seen[mask] = np.arange(int(mask.sum())) % sizes[d]
    return list(zip(used.tolist(), seen.tolist()))


def sample_indices(n: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` row indices of a dataset of ``n``, sorted: a random subset without replacement when
    smaller; when larger, every row ``num_samples // n`` times plus a random subset for the rest."""
    if n < 1:
        raise DataError("num_samples", f"cannot sample from an empty dataset (num_samples={num_samples})")
    if num_samples < 1:
        raise DataError(
            "num_samples", f"got {num_samples}", field="num_samples", expected="a positive integer"
        )
    rng = np.random.default_rng(seed)
    repeats, rest = divmod(num_samples, n)
    picked = rng.choice(n, size=rest, replace=False)
    return sorted(list(range(n)) * repeats + picked.tolist())


def dataset_indices(
    n: int, *, num_samples: int | None = None, max_samples: int | None = None, seed: int = 0
) -> list[int]:
    """Row indices of one dataset after its num_samples (re)sampling and the max_samples cap (first rows kept)."""
    idx = sample_indices(n, num_samples, seed) if num_samples is not None else list(range(n))
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(
                "max_samples", f"got {max_samples}", field="max_samples", expected="a positive integer"
            )
        idx = idx[:max_samples]
    return idx


def split_indices(n: int, val_size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Random (train, val) split of positions ``0..n-1``, each sorted so the mix order is kept.

    ``val_size``: a fraction in (0, 1) (rounded up, like HF ``train_test_split``) or a row count.
    """
    count = _val_count(n, val_size)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[count:].tolist()), sorted(perm[:count].tolist())


def _val_count(n: int, val_size: float | int) -> int:
    expected = "a fraction in (0, 1) or a row count smaller than the number of rows"
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError("val_size", f"got {val_size!r}", field="val_size", expected=expected)
    if isinstance(val_size, float) and val_size >= 1 and val_size.is_integer():
        val_size = int(val_size)  # LLaMA-Factory reads val_size > 1 as a count
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise DataError("val_size", f"got {val_size}", field="val_size", expected=expected)
        count = math.ceil(val_size * n)
    else:
        count = val_size
    if count < 1 or count >= n:
        raise DataError("val_size", f"val_size={val_size} leaves {n - count} of {n} rows for training",
                        field="val_size", expected=expected, fix="lower val_size or add data")  # fmt: skip
    return count
