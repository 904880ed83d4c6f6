"""Run manifest ``run.json``: what ran (config, data, tokenizer, seed), with what software, on what machine.

The stage calls ``start_run_manifest`` on the main process before training and ``finish_run_manifest``
when it ends, whatever the outcome. Both write atomically, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

MANIFEST = "run.json"
# tunesmith's own stack, then optional packages that change which kernels run (recorded when installed).
PACKAGES = ("tunesmith", "torch", "transformers", "tokenizers", "peft", "accelerate", "trl", "datasets",
            "pyarrow", "triton", "flash-attn-4", "nvidia-cutlass-dsl", "flash-attn", "liger-kernel",
            "bitsandbytes", "deepspeed")  # fmt: skip
Status = Literal["completed", "failed", "interrupted"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Installed versions of PACKAGES (metadata only, nothing imported); absent packages are left out."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(cwd: Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the git repository holding ``cwd``; None outside one or without git."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model and cores, RAM, GPU names and memory, CUDA version."""
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "cpu": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _write(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def start_run_manifest(
    output_dir: str | Path, resolved_config: dict[str, Any], data_hashes: dict[str, str], tokenizer_hash: str,
    seed: int,
) -> Path:  # fmt: skip
    """Write ``output_dir/run.json`` with status "running"; return its path."""
    path = Path(output_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "status": "running",
        "start_time": _now(),
        "end_time": None,
        "command": sys.argv,
        "config": resolved_config,
        "data_hashes": data_hashes,
        "tokenizer_hash": tokenizer_hash,
        "seed": seed,
        "packages": package_versions(),
        "git": git_revision(),
        "hardware": hardware(),
        "final_metrics": {},
    }
    _write(path, manifest)
    return path


def finish_run_manifest(path: str | Path, final_metrics: dict[str, Any], status: Status) -> None:
    """Record end time, status and final metrics in the manifest ``start_run_manifest`` wrote."""
    if status not in ("completed", "failed", "interrupted"):
        raise ValueError(f"status must be completed, failed or interrupted, got {status!r}")
    path = Path(path)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(status=status, end_time=_now(), final_metrics=final_metrics)
    _write(path, manifest)
