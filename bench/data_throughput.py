"""Data-throughput benchmark: tunesmith vs LLaMA-Factory on read + convert + template + tokenize.

alpaca_en_demo (1,000 rows) is cycled to --rows rows and written once to a temp dataset folder; each
side then preprocesses that same file for SFT (cutoff_len 2048, no cache) in a child process, at each
--workers count, with two tokenizers: tunesmith's tiny byte-level BPE (ChatML) and Qwen2.5-Instruct.
The parent samples the summed RSS of each child's process tree (workers included) every ~50 ms.
Raw results go to bench/results/data_throughput-<UTC time>.json.

    python bench/data_throughput.py [--rows 100000] [--workers 1 2] [--sides llamafactory tunesmith]

The LLaMA-Factory venv (bench/.venv-llamafactory) is built on first use; see bench/llamafactory_env.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package
try:
    import psutil  # noqa: F401  (the harness needs it; say how to get it rather than a bare traceback)

    import tunesmith  # noqa: F401
except ImportError as exc:
    raise SystemExit(
        f"bench/data_throughput.py: {exc}. Run it with tunesmith's venv (`make venv`, then "
        "`.venv/bin/python bench/data_throughput.py`)."
    ) from exc

from _common import (  # noqa: E402
    ALPACA_DEMO,
    BENCH,
    QWEN_TOKENIZER,
    REPO,
    Measured,
    device_info,
    measure_subprocess,
    now_iso,
    package_versions,
    replicate_rows,
    write_dataset_dir,
)

CUTOFF_LEN = 2048
RESULTS = BENCH / "results"
LF_VERSION_NAMES = ["llamafactory", "transformers", "tokenizers", "datasets", "pyarrow", "torch", "numpy"]
TS_VERSION_NAMES = [
    "tunesmith",
    "transformers",
    "tokenizers",
    "datasets",
    "pyarrow",
    "torch",
    "numpy",
    "psutil",
]


@dataclass(frozen=True)
class Case:
    """One tokenizer with the equivalent template name on each side."""

    name: str
    tokenizer_dir: Path
    lf_template: str
    ts_template: str


def cases() -> list[Case]:
    """The benchmark's tokenizers: tiny ChatML (no default system prompt) and Qwen2.5 (with one)."""
    from tunesmith.tiny import tiny_tokenizer_dir

    return [
        Case("tiny-chatml", tiny_tokenizer_dir(), lf_template="chatml", ts_template="chatml"),
        Case("qwen2.5-instruct", QWEN_TOKENIZER, lf_template="qwen", ts_template="qwen"),
    ]


def child_env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    """Environment of both sides' children: offline, and tokenizers' own thread pool off.

    TOKENIZERS_PARALLELISM=false keeps a "1 worker" run on one core on both sides, so the worker
    count is the only source of parallelism being compared.
    """
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DISABLE_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_pythonpath), env.get("PYTHONPATH", "")]))
    return env


def measure_llamafactory(lf_python: Path, dataset_dir: Path, case: Case, workers: int) -> Measured:
    """Run bench/lf_preprocess.py in the LLaMA-Factory venv and measure it."""
    from llamafactory_env import write_stubs

    cmd = [
        str(lf_python),
        str(BENCH / "lf_preprocess.py"),
        "--dataset-dir", str(dataset_dir),
        "--tokenizer", str(case.tokenizer_dir),
        "--template", case.lf_template,
        "--workers", str(workers),
        "--cutoff-len", str(CUTOFF_LEN),
    ]  # fmt: skip
    return measure_subprocess(cmd, child_env(write_stubs()), cwd=REPO)


def run_tunesmith(
    dataset_dir: Path, data_file: Path, tokenizer_dir: Path, template: str, workers: int, cutoff_len: int
) -> dict:
    """Read + convert + template + tokenize data_file with tunesmith.data.pipeline (in this process).

    Returns {"seconds": time from start of reading to tokenized dataset ready, "cpu_s": _common.cpu_seconds()
    over the same window, "rows_out", "input_tokens", "supervised_tokens" (labels != -100)}. The cache
    goes to a fresh temporary folder, so every step really runs.
    """
    import hashlib
    import time

    import pyarrow.compute as pc
    from _common import DATASET_NAME, cpu_seconds
    from transformers import AutoTokenizer

    from tunesmith.data.pipeline import DataOptions, prepare
    from tunesmith.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tmpl = resolve_template(template, tokenizer)
    with tempfile.TemporaryDirectory(prefix="ts-bench-cache-") as cache:
        opts = DataOptions(
            dataset=(DATASET_NAME,),
            dataset_dir=str(dataset_dir),
            stage="sft",
            cutoff_len=cutoff_len,
            num_workers=workers,
            cache_dir=cache,
            overwrite_cache=True,
            show_progress=False,
        )
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        prepared = prepare(opts, tokenizer, tmpl)
        seconds, cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
        train = prepared.train
        return {
            "seconds": seconds,
            "cpu_s": cpu_s,
            "rows_out": len(train),
            "input_tokens": train.num_tokens(),
            "input_ids_sha1": hashlib.sha1(
                pc.list_flatten(train.table.column("input_ids")).cast("int32").to_numpy().tobytes()
            ).hexdigest(),
            # every label != -100 (the first position included), counted as the LLaMA-Factory side does
            "supervised_tokens": int(
                pc.sum(pc.not_equal(pc.list_flatten(train.table.column("labels")), -100)).as_py() or 0
            ),
        }


def _tunesmith_child(argv: list[str]) -> None:
    """Child-process entry: run run_tunesmith once and print its JSON result line."""
    p = argparse.ArgumentParser()
    p.add_argument("--dataset-dir", type=Path, required=True)
    p.add_argument("--data-file", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--cutoff-len", type=int, required=True)
    a = p.parse_args(argv)
    result = run_tunesmith(a.dataset_dir, a.data_file, a.tokenizer, a.template, a.workers, a.cutoff_len)
    result.update(
        side="tunesmith",
        template=a.template,
        tokenizer=str(a.tokenizer),
        workers=a.workers,
        cutoff_len=a.cutoff_len,
        ru_maxrss_self_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ru_maxrss_children_bytes=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    )
    print(json.dumps(result), flush=True)


def measure_tunesmith(
    dataset_dir: Path, data_file: Path, case: Case, workers: int, threads: bool = False
) -> Measured:
    """Run run_tunesmith in a child of this interpreter and measure it the same way as LLaMA-Factory.

    threads=True leaves TOKENIZERS_PARALLELISM unset (the tokenizers library's default: its Rust thread pool
    may use every core inside one worker) — what a user gets out of the box; reported as its own side.
    """
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child-tunesmith",
        "--dataset-dir", str(dataset_dir),
        "--data-file", str(data_file),
        "--tokenizer", str(case.tokenizer_dir),
        "--template", case.ts_template,
        "--workers", str(workers),
        "--cutoff-len", str(CUTOFF_LEN),
    ]  # fmt: skip
    env = child_env()
    if threads:
        env.pop("TOKENIZERS_PARALLELISM")
    return measure_subprocess(cmd, env, cwd=REPO)


def comparison(records: list[dict]) -> list[dict]:
    """tunesmith / LLaMA-Factory ratios per (case, workers) against the goals: >= 2x rows/s, <= memory."""
    out = []
    for case, workers in sorted({(r["case"], r["workers"]) for r in records}):
        by_side = {r["side"]: r for r in records if r["case"] == case and r["workers"] == workers}
        lf = by_side.get("llamafactory")
        if lf is None:
            continue
        for side in ("tunesmith", "tunesmith-threads"):
            ts = by_side.get(side)
            if ts is None:
                continue
            speed = ts["rows_per_s"] / lf["rows_per_s"]
            mem = ts["peak_tree_rss_mb"] / lf["peak_tree_rss_mb"]
            out.append({
                "case": case, "workers": workers, "side": side,
                "rows_per_s_ratio": round(speed, 2),
                "rows_per_cpu_s_ratio": round(ts["rows_per_cpu_s"] / lf["rows_per_cpu_s"], 2),
                "peak_memory_ratio": round(mem, 2),
                "goal_2x_rows_per_s": "pass" if speed >= 2 else "fail",
                "goal_no_more_memory": "pass" if mem <= 1 else "fail",
            })  # fmt: skip
    return out


def record(case: Case, side: str, workers: int, rows: int, m: Measured) -> dict:
    """One flat result record: throughput, memory and token totals of one child run."""
    mib = 1024 * 1024
    return {
        "case": case.name,
        "side": side,
        "workers": workers,
        "rows_in": rows,
        "rows_per_s": rows / m.result["seconds"],
        "rows_per_cpu_s": rows / m.result["cpu_s"],
        "peak_tree_rss_mb": m.peak_tree_rss_bytes / mib,
        "peak_tree_procs": m.peak_tree_procs,
        "rss_samples": m.samples,
        "parent_ru_maxrss_mb": m.result["ru_maxrss_self_bytes"] / mib,
        "process_wall_s": m.wall_s,
        **m.result,
    }


def token_check(records: list[dict]) -> list[dict]:
    """Both sides' token totals side by side for each (case, workers), with their ratio."""
    out = []
    keys = sorted({(r["case"], r["workers"]) for r in records})
    for case, workers in keys:
        by_side = {r["side"]: r for r in records if r["case"] == case and r["workers"] == workers}
        row: dict = {"case": case, "workers": workers}
        for side, r in by_side.items():
            row[f"{side}_input_tokens"] = r["input_tokens"]
            row[f"{side}_supervised_tokens"] = r["supervised_tokens"]
            row[f"{side}_input_ids_sha1"] = r.get("input_ids_sha1")
        if {"llamafactory", "tunesmith"} <= by_side.keys():
            row["input_tokens_ratio_ts_over_lf"] = (
                by_side["tunesmith"]["input_tokens"] / by_side["llamafactory"]["input_tokens"]
            )
            row["input_ids_identical"] = by_side["tunesmith"].get("input_ids_sha1") == by_side[
                "llamafactory"
            ].get("input_ids_sha1")
        out.append(row)
    return out


def _summary_line(r: dict) -> str:
    return (
        f"{r['case']:>17} {r['side']:>12} w={r['workers']}  {r['rows_per_s']:>9.0f} rows/s  "
        f"{r['seconds']:7.1f} s (cpu {r['cpu_s']:6.1f} s)  peak tree {r['peak_tree_rss_mb']:7.0f} MB ({r['peak_tree_procs']} procs)  "
        f"ru_maxrss {r['parent_ru_maxrss_mb']:6.0f} MB  tokens {r['input_tokens']}"
    )


def main(argv: list[str]) -> Path:
    """Run the benchmark and write its raw JSON; returns the results file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows after replicating alpaca_en_demo")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, same on both sides")
    p.add_argument(
        "--sides",
        nargs="+",
        choices=["llamafactory", "tunesmith", "tunesmith-threads"],
        default=["llamafactory", "tunesmith", "tunesmith-threads"],
    )
    p.add_argument("--cases", nargs="+", default=None, help="subset of: tiny-chatml qwen2.5-instruct")
    p.add_argument("--out", type=Path, default=None, help="results file (default bench/results/...)")
    args = p.parse_args(argv)

    selected = [c for c in cases() if args.cases is None or c.name in args.cases]
    lf_python = None
    if "llamafactory" in args.sides:
        from llamafactory_env import ensure_llamafactory_venv

        lf_python = ensure_llamafactory_venv()

    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        dataset_dir = Path(tmp) / "data"
        data_file = write_dataset_dir(dataset_dir, replicate_rows(ALPACA_DEMO, args.rows))
        for case in selected:
            for workers in args.workers:
                for side in args.sides:
                    load_before = os.getloadavg()[0]
                    if side == "llamafactory":
                        m = measure_llamafactory(lf_python, dataset_dir, case, workers)
                    else:
                        m = measure_tunesmith(
                            dataset_dir, data_file, case, workers, side == "tunesmith-threads"
                        )
                    load = {"loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
                    records.append(record(case, side, workers, args.rows, m) | load | {"side": side})
                    print(_summary_line(records[-1]), flush=True)

    versions = {"tunesmith_env": package_versions(sys.executable, TS_VERSION_NAMES)}
    if lf_python is not None:
        versions["llamafactory_env"] = package_versions(lf_python, LF_VERSION_NAMES)
    stamp = now_iso()
    out = args.out or RESULTS / f"data_throughput-{stamp.replace(':', '').replace('+0000', 'Z')}.json"
    report = {
        "benchmark": "data_throughput",
        "date": stamp,
        "device": device_info(),
        "versions": versions,
        "source": str(ALPACA_DEMO.relative_to(REPO.parent)),
        "source_rows": len(json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))),
        "rows": args.rows,
        "cutoff_len": CUTOFF_LEN,
        "workers": args.workers,
        "timing": "seconds = start of reading the file -> tokenized dataset ready, in the child; "
        "rows_per_s = rows_in / seconds; cpu_s = user+sys CPU of the child and its workers over the same "
        "window (rows_per_cpu_s is less sensitive to other load on the machine)",
        "memory": "peak_tree_rss_mb = peak over ~50 ms samples of the summed RSS of the child and all its "
        "descendants (pages shared between processes count once in each); parent_ru_maxrss_mb = the child's own "
        "ru_maxrss; loadavg_1m_before shows whether other work shared the machine",
        "results": records,
        "token_check": token_check(records),
        "comparison": comparison(records),
        "sides": "llamafactory and tunesmith run with TOKENIZERS_PARALLELISM=false (one core per worker on both "
        "sides); tunesmith-threads leaves it unset, the library default a user gets",
    }
    for c in report["comparison"]:
        print(json.dumps(c))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child-tunesmith"]:
        _tunesmith_child(sys.argv[2:])
    else:
        main(sys.argv[1:])
