"""`tunesmith webui` on the command line: it serves on the given port and Ctrl-C ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tunesmith.webui.session import free_port


def test_webui_command_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "tunesmith.cli",
        "webui",
        "--port",
        str(port),
        "--root",
        str(tmp_path / "runs"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code
                break
            except requests.RequestException:
                time.sleep(0.5)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "no answer in 90 s"
        assert (tmp_path / "runs").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code in (0, 130)


def test_webui_help_lists_the_options(capsys) -> None:
    from tunesmith.cli import main

    try:
        main(["webui", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--host", "--port", "--root", "--password", "--lang"))
