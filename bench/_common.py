"""Shared pieces of the data-throughput benchmark: inputs, process-tree memory sampling, machine facts.

Runs in tunesmith's venv (needs psutil). The LLaMA-Factory side runs in its own venv and only talks
to this module through a child process that prints one JSON line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared"
ALPACA_DEMO = SHARED / "compat" / "llamafactory-data" / "alpaca_en_demo.json"
QWEN_TOKENIZER = SHARED / "fixtures" / "hf_tokenizers" / "qwen2.5-instruct"
DATASET_NAME = "alpaca_bench"
SAMPLE_INTERVAL_S = 0.05


def replicate_rows(src: Path, rows: int) -> list[dict]:
    """The rows of an alpaca JSON array, cycled until there are exactly `rows` of them."""
    base = json.loads(src.read_text(encoding="utf-8"))
    if not isinstance(base, list) or not base:
        raise ValueError(f"{src}: expected a non-empty JSON array of alpaca rows")
    return [base[i % len(base)] for i in range(rows)]


def write_dataset_dir(out_dir: Path, rows: list[dict]) -> Path:
    """Write rows as <out_dir>/alpaca_bench.json plus a dataset_info.json naming it; returns the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{DATASET_NAME}.json"
    data_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    # Alpaca columns are LLaMA-Factory's defaults (instruction/input/output), so only file_name is needed.
    info = {DATASET_NAME: {"file_name": data_file.name}}
    (out_dir / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return data_file


@dataclass(frozen=True)
class Measured:
    """A child run: its JSON result line, wall time and the peak summed RSS of its process tree."""

    result: dict
    wall_s: float
    peak_tree_rss_bytes: int
    peak_tree_procs: int
    samples: int


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """Sum of RSS over proc and all its descendants (processes that vanish mid-sample are skipped)."""
    total, count = 0, 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in members:
        try:
            total += p.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, count


def measure_subprocess(cmd: list[str], env: dict[str, str], cwd: Path) -> Measured:
    """Run cmd, sampling its process tree's summed RSS every ~50 ms; its last stdout line is JSON."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    peak, peak_procs, samples = 0, 0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_procs, samples
        while not stop.is_set():
            rss, n = _tree_rss(proc)
            samples += 1
            if rss > peak:
                peak, peak_procs = rss, n
            stop.wait(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # communicate() drains both pipes so a chatty child (progress bars) can never block on a full pipe.
        stdout, stderr = child.communicate()
    finally:
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        if child.poll() is None:  # interrupted: do not leave the child running
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {child.returncode}:\n{stderr[-4000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"{' '.join(cmd)} printed no JSON result line:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        )
    return Measured(json.loads(lines[-1]), wall, peak, peak_procs, samples)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (worker pools)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def device_info() -> dict:
    """CPU model, core counts and memory of this machine."""
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
    }


_VERSIONS_SNIPPET = """
import importlib.metadata as m, json, sys
out = {"python": sys.version.split()[0]}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def package_versions(python: Path | str, names: list[str]) -> dict[str, str | None]:
    """Installed versions of `names` in the environment of interpreter `python`."""
    out = subprocess.run(
        [str(python), "-c", _VERSIONS_SNIPPET, *names], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
