"""Jobs: real CLI subprocesses, a real tiny training watched to the end, compared, and one stopped midway."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.training.conftest import tiny_model_dir  # noqa: F401  (a fixture, used by name)
from tests.training.helpers import run_config, write_sft_data
from tunesmith.webui.jobs import Job, Progress
from tunesmith.webui.runs import compare, list_runs

# One torch thread per training process: three of them share this machine's cores.
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its (non-reaping) parent: it runs no more."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# A child that ignores SIGINT and SIGTERM and starts a grandchild that inherits that (SIG_IGN survives
# exec): only SIGKILL ends them, so stop() must escalate all the way and reach the grandchild too.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(grandchild.pid))
print("ready", flush=True)
time.sleep(120)
"""


def test_stop_escalates_to_sigkill_and_ends_the_grandchild(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    job = Job.spawn("stubborn", [sys.executable, "-c", STUBBORN, str(pid_file)], tmp_path / "stubborn.yaml")
    _wait(lambda: pid_file.exists() and pid_file.read_text(), 30, "the grandchild")
    grandchild = int(pid_file.read_text())
    _wait(lambda: "ready" in job.log_tail(), 10, "the child's output in the log")
    assert job.running() and not _gone(grandchild)
    t0 = time.monotonic()
    code = job.stop(timeout=2.0)
    assert code == -9 and job.returncode() == -9 and not job.running()
    assert time.monotonic() - t0 < 4.0
    assert _gone(job.pid) and _gone(grandchild)
    assert job.stop() == -9  # stopping a stopped job just reports its code


POLITE = """
import time
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("got ctrl-c")
    raise SystemExit(130)
"""


def test_stop_sends_sigint_first(tmp_path: Path) -> None:
    job = Job.spawn("sleepy", [sys.executable, "-c", POLITE], tmp_path / "sleepy.yaml")
    time.sleep(1.0)  # let the interpreter start and install its SIGINT handler
    t0 = time.monotonic()
    assert job.stop(timeout=20.0) == 130
    assert time.monotonic() - t0 < 10.0  # ended by SIGINT, within its share of the timeout
    assert "got ctrl-c" in job.log_tail()


def test_progress_reads_the_log_incrementally(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    log = out / "trainer_log.jsonl"
    log.write_text(json.dumps({"step": 99, "total_steps": 99, "loss": 9.0}) + "\n")  # a previous run's
    os.utime(log, (time.time() - 60, time.time() - 60))
    job = Job.spawn("train", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "t.yaml",
                    output_dir=out)  # fmt: skip
    try:
        assert job.progress() is None  # the old log is not this job's
        record = {"step": 1, "total_steps": 4, "percent": 25.0, "elapsed_s": 1.0, "remaining_s": 3.0,
                  "tokens_per_s": 10.0, "loss": 2.0, "eval_loss": None}  # fmt: skip
        log.write_text(json.dumps(record) + "\n" + '{"step": 2, "lo')  # the new run starts the log afresh
        assert job.progress() == Progress(1, 4, 25.0, 1.0, 3.0, 10.0, 2.0, None)
        with log.open("a") as f:
            f.write('ss": 1.5}\n' + json.dumps(record | {"step": 2, "loss": None, "eval_loss": 1.8}) + "\n")
        got = job.progress()
        assert got is not None and (got.step, got.loss, got.eval_loss) == (2, 1.5, 1.8)
        log.write_text(json.dumps(record | {"loss": 3.0}) + "\n")  # rewritten (a restarted run)
        assert job.progress() == Progress(1, 4, 25.0, 1.0, 3.0, 10.0, 3.0, None)
    finally:
        job.stop(timeout=5.0)


def test_start_writes_the_config_and_runs_the_cli(tmp_path: Path) -> None:
    job = Job.start("templates", {"note": "configless"}, tmp_path / "jobs", env=ENV)
    assert job.config_path.parent == tmp_path / "jobs" and job.config_path.name.endswith("-templates.yaml")
    assert job.log_path == job.config_path.with_suffix(".log")
    assert yaml.safe_load(job.config_path.read_text()) == {"note": "configless"}
    assert job.command_line() == "tunesmith templates" and job.output_dir is None
    _wait(lambda: not job.running(), 60, "tunesmith templates")
    assert job.returncode() == 0 and "qwen3" in job.log_tail() and job.progress() is None
    assert job.log_tail(10) == job.log_tail()[-10:]
    twin = Job.start("templates", {}, tmp_path / "jobs", env=ENV)
    assert twin.id != job.id  # same second, same command: distinct files
    twin.stop()


@pytest.fixture(scope="module")
def trainings(tiny_model_dir: Path, tmp_path_factory) -> Iterator[tuple[Path, dict[str, Job]]]:  # noqa: F811
    """Three `tunesmith train` jobs started together: a, b (another learning rate) and a long one."""
    root = tmp_path_factory.mktemp("webui_runs")
    data = write_sft_data(root / "sft.json")
    common = {"data_cache_dir": str(root / "cache")}
    configs = {
        "a": run_config(tiny_model_dir, data, root / "out" / "a", **common),
        "b": run_config(tiny_model_dir, data, root / "out" / "b", learning_rate=5e-3, **common),
        "long": run_config(tiny_model_dir, data, root / "out" / "long", max_steps=100_000, **common),
    }
    jobs = {name: Job.start("train", cfg, root / "jobs", env=ENV) for name, cfg in configs.items()}
    yield root, jobs
    for job in jobs.values():
        job.stop(timeout=5.0)


def test_training_job_progress_to_completion_then_history_and_compare(trainings) -> None:
    root, jobs = trainings
    a, b = jobs["a"], jobs["b"]
    assert a.output_dir == root / "out" / "a"
    assert a.command_line() == f"tunesmith train {a.config_path}"
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while a.running() and time.monotonic() < deadline:
        progress = a.progress()
        if progress is not None and (not seen or progress.step != seen[-1]):
            seen.append(progress.step)
        time.sleep(0.05)
    assert a.returncode() == 0, a.log_tail()
    final = a.progress()
    assert final is not None and (final.step, final.total_steps, final.percent) == (12, 12, 100.0)
    assert final.loss is not None and final.eval_loss is None and final.elapsed_s > 0
    assert seen == sorted(seen) and seen[-1] == 12
    assert "step 12/12" in a.log_tail()

    _wait(lambda: not b.running(), 120, "run b")
    assert b.returncode() == 0, b.log_tail()
    runs = {r.name: r for r in list_runs(root / "out")}
    for name in ("a", "b"):
        info = runs[name]
        assert (info.status, info.stage, info.method, info.step, info.total_steps) == (
            "completed", "sft", "lora", 12, 12,
        )  # fmt: skip
        assert info.metrics["train_loss"] > 0
    comparison = compare(root / "out" / "a", root / "out" / "b", root / "out")
    assert comparison.differing == [
        ("learning_rate", 1e-2, 5e-3),
        ("output_dir", str(root / "out" / "a"), str(root / "out" / "b")),
    ]
    assert set(comparison.curves["loss"]) == {"a", "b"}
    assert [s for s, _ in comparison.curves["loss"]["a"]] == list(range(1, 13))
    assert comparison.curves["lr"]["b"][0] == (1, 5e-3)


def test_stopping_a_training_job_marks_the_run_interrupted(trainings) -> None:
    root, jobs = trainings
    job = jobs["long"]
    _wait(lambda: (job.progress() or None) is not None and job.progress().step >= 2, 120, "training steps")
    children = [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    assert job.stop(timeout=30.0) == 130  # Ctrl-C: the CLI's "interrupted" exit code
    assert _gone(job.pid) and all(_gone(pid) for pid in children)
    manifest = json.loads((root / "out" / "long" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["end_time"]
    info = next(r for r in list_runs(root / "out") if r.name == "long")
    assert info.status == "interrupted" and info.step is not None and info.step < 100_000
    assert "interrupted" in job.log_tail()
