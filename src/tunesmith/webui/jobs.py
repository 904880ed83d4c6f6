"""A tunesmith CLI command running in a subprocess: what the web UI starts, watches and stops.

The UI writes the config to a YAML file and runs ``python -m tunesmith.cli COMMAND CONFIG``: the same
code path as a user's shell. The child gets its own process group (session), so stopping it reaches
every process it started (dataloader workers, torchrun ranks) and none is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from tunesmith.config import yaml_text
from tunesmith.webui.runs import LOG_FILE, read_log

__all__ = ["CONFIGLESS_COMMANDS", "Job", "Progress"]

# Commands that take no CONFIG argument (`tunesmith score FILE`): their YAML is written for the record
# only, and extra_args carry everything (e.g. the predictions file).
CONFIGLESS_COMMANDS = frozenset({"score", "templates", "version"})
# Share of stop()'s timeout each signal gets to end the group: SIGINT (clean: run.json says
# "interrupted"), then SIGTERM, then SIGKILL.
_STOP_SHARES = ((signal.SIGINT, 0.6), (signal.SIGTERM, 0.3), (signal.SIGKILL, 0.1))
_POLL_S = 0.05


@dataclass
class Progress:
    """Where a training job stands, from its output_dir/trainer_log.jsonl."""

    step: int
    total_steps: int
    percent: float
    elapsed_s: float
    remaining_s: float | None
    tokens_per_s: float | None
    loss: float | None  # the latest logged training loss
    eval_loss: float | None  # the latest logged eval loss


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Job:
    """One CLI command in its own process group; stdout and stderr go to a log file."""

    def __init__(
        self,
        command: str,
        config_path: Path,
        log_path: Path,
        output_dir: Path | None,
        process: subprocess.Popen[bytes],
        argv: Sequence[str],
    ) -> None:
        self.command = command
        self.config_path = config_path
        self.log_path = log_path
        self.output_dir = output_dir
        self.pid = process.pid
        self.argv = tuple(argv)
        self.started = time.time()
        self._process = process
        self._log_offset = 0  # bytes of trainer_log.jsonl already read
        self._log_lock = threading.Lock()  # UI event handlers may poll progress from several threads
        self._progress: Progress | None = None
        self._loss: float | None = None
        self._eval_loss: float | None = None

    @property
    def id(self) -> str:
        """A unique name for the job: its files' stem, e.g. 20261128-101500-123456-train."""
        return self.config_path.stem

    @classmethod
    def start(
        cls,
        command: str,
        config: Mapping[str, Any],
        jobs_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Job:
        """Write ``config`` to jobs_dir/<stamp>-<command>.yaml and start
        ``python -m tunesmith.cli <command> <yaml> *extra_args`` (stdout+stderr to <stamp>-<command>.log);
        returns at once. Commands in CONFIGLESS_COMMANDS get only ``extra_args``."""
        jobs_dir = Path(jobs_dir)
        jobs_dir.mkdir(parents=True, exist_ok=True)
        config_path = _new_file(jobs_dir, command, yaml_text(config))
        args = [] if command in CONFIGLESS_COMMANDS else [str(config_path)]
        argv = [sys.executable, "-m", "tunesmith.cli", command, *args, *extra_args]
        output_dir = Path(str(config["output_dir"])) if config.get("output_dir") else None
        return cls.spawn(command, argv, config_path, output_dir=output_dir, env=env)

    @classmethod
    def spawn(
        cls,
        command: str,
        argv: Sequence[str],
        config_path: Path,
        *,
        output_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Job:
        """Start ``argv`` in a new session, logging to ``config_path`` with suffix .log (what start runs)."""
        log_path = config_path.with_suffix(".log")
        environ = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}  # log lines reach the UI live
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                start_new_session=True,
            )
        return cls(command, config_path, log_path, output_dir, process, argv)

    def returncode(self) -> int | None:
        """The exit code; None while running (a negative code: killed by that signal)."""
        return self._process.poll()

    def running(self) -> bool:
        return self.returncode() is None

    def command_line(self) -> str:
        """The equivalent shell command: ``tunesmith train path.yaml [extra args]``."""
        return shlex.join(["tunesmith", *self.argv[3:]])

    def _processes(self) -> list[psutil.Process]:
        """Live processes of the job: its process group and every descendant (also one in a new group)."""
        found: dict[int, psutil.Process] = {}
        try:
            main = psutil.Process(self.pid)
            for p in [main, *main.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if p.pid not in found and os.getpgid(p.pid) == self.pid:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.Error):
                continue
        return [p for p in found.values() if _alive(p)]

    def stop(self, timeout: float = 10.0) -> int:
        """End the job and everything it started: SIGINT to its group, then SIGTERM, then SIGKILL, each
        given its share of ``timeout`` (60/30/10 %); returns the exit code (130 after a clean Ctrl-C)."""
        tracked = {p.pid: p for p in self._processes()}
        for sig, share in _STOP_SHARES:
            tracked |= {p.pid: p for p in self._processes()}  # children started since
            if not any(_alive(p) for p in tracked.values()) and self.returncode() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
                os.killpg(self.pid, sig)
            if sig == signal.SIGKILL:  # descendants that left the group (a new session) too
                for p in tracked.values():
                    try:
                        p.kill()
                    except psutil.Error:
                        continue
            deadline = time.monotonic() + timeout * share
            while time.monotonic() < deadline:
                self._process.poll()  # reap the main process, so it does not linger as a zombie
                if self._process.returncode is not None and not any(_alive(p) for p in tracked.values()):
                    break
                time.sleep(_POLL_S)
        try:
            return self._process.wait(timeout=max(timeout * 0.1, 1.0))
        except subprocess.TimeoutExpired:  # unkillable (uninterruptible I/O): report SIGKILL's code
            return -signal.SIGKILL

    def log_tail(self, max_chars: int = 20000) -> str:
        """The end of the job's output; progress bars redrawn with carriage returns show their last state."""
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 4 * max_chars))  # UTF-8: at most 4 bytes a character
                data = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        lines = [next((part for part in reversed(line.split("\r")) if part), "") for line in data.split("\n")]
        return "\n".join(lines)[-max_chars:]

    def progress(self) -> Progress | None:
        """The latest training progress (train jobs with an output_dir); None until the first log record.

        Reads only the lines appended since the last call. A log older than the job (a previous run in
        the same output_dir, before this run starts a fresh one) is ignored.
        """
        if self.command != "train" or self.output_dir is None:
            return None
        with self._log_lock:
            return self._read_progress(self.output_dir / LOG_FILE)

    def _read_progress(self, path: Path) -> Progress | None:
        try:
            stat = path.stat()
        except OSError:
            return self._progress
        if stat.st_mtime < self.started - 1.0:
            return self._progress
        if stat.st_size < self._log_offset:  # rewritten from scratch: start over
            self._log_offset, self._progress, self._loss, self._eval_loss = 0, None, None, None
        records, self._log_offset = read_log(path, self._log_offset)
        for record in records:
            if not isinstance(record.get("step"), int):
                continue
            if record.get("loss") is not None:
                self._loss = _float(record["loss"])
            if record.get("eval_loss") is not None:
                self._eval_loss = _float(record.get("eval_loss"))
            self._progress = Progress(
                step=record["step"],
                total_steps=int(record.get("total_steps") or 0),
                percent=_float(record.get("percent")) or 0.0,
                elapsed_s=_float(record.get("elapsed_s")) or 0.0,
                remaining_s=_float(record.get("remaining_s")),
                tokens_per_s=_float(record.get("tokens_per_s")),
                loss=self._loss,
                eval_loss=self._eval_loss,
            )
        return self._progress


def _new_file(folder: Path, command: str, text: str) -> Path:
    """Create folder/<stamp>-<command>.yaml with ``text``; the stamp is made unique if taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for n in range(1000):
        path = folder / f"{stamp}{f'-{n}' if n else ''}-{command}.yaml"
        try:
            with path.open("x", encoding="utf-8") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free job file name for {stamp}-{command}.yaml")
