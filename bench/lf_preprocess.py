"""Preprocess one dataset with LLaMA-Factory and print one JSON result line (runs in its own venv).

Drives LLaMA-Factory's own programmatic path, the same calls its test helper
`llamafactory.train.test_utils.load_dataset_module` makes: get_train_args -> load_tokenizer ->
get_template_and_fix_tokenizer -> data.loader.get_dataset (read json, align/convert, template,
tokenize). The timed window is get_dataset alone: from the start of reading the file to the tokenized
dataset being ready. Every datasets cache (json->arrow, align map, tokenize map) goes to a fresh
empty folder, so nothing can be a cache hit; `overwrite_cache` is set as well.

Usage (see bench/data_throughput.py, which sets PYTHONPATH for the torchaudio stub):
    .venv-llamafactory/bin/python bench/lf_preprocess.py --dataset-dir D --tokenizer T --template qwen --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

DATASET_NAME = "alpaca_bench"  # the name bench/_common.py writes into dataset_info.json
IGNORE_INDEX = -100


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, required=True, help="folder with dataset_info.json")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder (model_name_or_path)")
    p.add_argument("--template", required=True, help="LLaMA-Factory template name, e.g. qwen or chatml")
    p.add_argument("--workers", type=int, required=True, help="preprocessing_num_workers")
    p.add_argument("--cutoff-len", type=int, default=2048)
    return p.parse_args()


def _count_tokens(dataset) -> dict[str, int]:
    """Rows, input tokens and supervised (label != IGNORE_INDEX) tokens of a tokenized dataset."""
    import pyarrow.compute as pc

    table = dataset.data.table
    input_ids = table.column("input_ids")
    labels = pc.list_flatten(table.column("labels"))
    import hashlib

    flat = pc.list_flatten(input_ids).cast("int32").to_numpy(zero_copy_only=False)
    return {
        "rows_out": table.num_rows,
        # every row's ids in order: equal on both sides means the same tokens, not just as many
        "input_ids_sha1": hashlib.sha1(flat.tobytes()).hexdigest(),
        "input_tokens": int(pc.sum(pc.list_value_length(input_ids)).as_py() or 0),
        "supervised_tokens": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the map's worker pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fresh_cache_files(dataset, cache_dir: Path, since: float) -> bool:
    """True when the result is backed by arrow files written into cache_dir during the timed window."""
    files = [Path(f["filename"]) for f in dataset.cache_files]
    return bool(files) and all(
        f.resolve().is_relative_to(cache_dir.resolve()) and f.stat().st_mtime >= since for f in files
    )


def main() -> None:
    args = _parse()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        cache_dir = Path(tmp) / "hf_datasets_cache"
        cache_dir.mkdir()
        # datasets reads HF_DATASETS_CACHE at import time, so set it before llamafactory imports datasets.
        os.environ["HF_DATASETS_CACHE"] = str(cache_dir)
        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.data.loader import get_dataset
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        import_s = time.perf_counter() - started
        model_args, data_args, training_args, _, _ = get_train_args(
            {
                "stage": "sft",
                "do_train": True,
                "finetuning_type": "lora",
                "model_name_or_path": str(args.tokenizer),
                "dataset": DATASET_NAME,
                "dataset_dir": str(args.dataset_dir),
                "template": args.template,
                "cutoff_len": args.cutoff_len,
                "overwrite_cache": True,
                "preprocessing_num_workers": args.workers,
                "cache_dir": str(cache_dir),
                "output_dir": str(Path(tmp) / "out"),
                "report_to": "none",
            }
        )
        t_tok = time.perf_counter()
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        tokenizer_s = time.perf_counter() - t_tok

        wall_clock_start = time.time()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        dataset_module = get_dataset(
            template, model_args, data_args, training_args, "sft", **tokenizer_module
        )
        seconds = time.perf_counter() - t0
        cpu_s = _cpu_seconds() - cpu0

        train = dataset_module["train_dataset"]
        counts = _count_tokens(train)
        fresh = _fresh_cache_files(train, cache_dir, wall_clock_start - 1.0)
    usage_self = resource.getrusage(resource.RUSAGE_SELF)
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "side": "llamafactory",
        "template": args.template,
        "tokenizer": str(args.tokenizer),
        "workers": args.workers,
        "cutoff_len": args.cutoff_len,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "import_s": import_s,
        "tokenizer_load_s": tokenizer_s,
        "map_ran_fresh": fresh,
        **counts,
        # Linux reports ru_maxrss in KiB.
        "ru_maxrss_self_bytes": usage_self.ru_maxrss * 1024,
        "ru_maxrss_children_bytes": usage_children.ru_maxrss * 1024,
    }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
