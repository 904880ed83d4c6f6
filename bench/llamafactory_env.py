"""Create (or reuse) the isolated LLaMA-Factory venv used as the benchmark's reference side.

LLaMA-Factory pins transformers/datasets ranges that differ from tunesmith's, so it lives in its own
venv, bench/.venv-llamafactory. Install order, as the tracking issue prescribes:

1. torch first, pinned (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build);
2. llamafactory's Requires-Dist from the wheel's METADATA, minus torch/torchaudio/torchvision and
   extras, with gradio pinned;
3. llamafactory itself with --no-deps;
4. a stub `torchaudio` package on PYTHONPATH: its text-only code paths import it but never call it.

Run directly to build it: `python bench/llamafactory_env.py` prints the venv's python path.
"""

from __future__ import annotations

import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV_DIR = BENCH / ".venv-llamafactory"
WORK_DIR = BENCH / ".work"
STUBS_DIR = WORK_DIR / "stubs"
WHEEL_DIR = WORK_DIR / "wheels"

# Newest llamafactory on PyPI when the benchmark was written (`pip index versions llamafactory`).
LLAMAFACTORY_VERSION = "0.9.5"
TORCH_VERSION = "2.13.0"
GRADIO_PIN = "gradio==5.50.0"
SKIPPED = {"torch", "torchaudio", "torchvision", "gradio"}

_STUB = '"""Stub for the benchmark: LLaMA-Factory text-only paths import torchaudio but never use it."""\n'


def venv_python() -> Path:
    """Path of the LLaMA-Factory venv's interpreter."""
    return VENV_DIR / "bin" / "python"


def _stamp() -> Path:
    return VENV_DIR / ".bench-installed"


def _stamp_text() -> str:
    return f"llamafactory=={LLAMAFACTORY_VERSION} torch=={TORCH_VERSION} {GRADIO_PIN}\n"


def _pip(*args: str) -> None:
    cmd = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def _requirement_name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if match is None:
        raise ValueError(f"cannot parse requirement {req!r} from llamafactory METADATA")
    return match.group(1).lower().replace("_", "-")


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a wheel, without extras-only entries and without the skipped packages."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    reqs = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        if _requirement_name(req) in SKIPPED:
            continue
        reqs.append(req)
    return reqs


def write_stubs() -> Path:
    """Create bench/.work/stubs/torchaudio/__init__.py; returns the folder to put on PYTHONPATH."""
    pkg = STUBS_DIR / "torchaudio"
    pkg.mkdir(parents=True, exist_ok=True)
    init = pkg / "__init__.py"
    if not init.exists() or init.read_text() != _STUB:
        init.write_text(_STUB)
    return STUBS_DIR


def ensure_llamafactory_venv() -> Path:
    """Build the venv unless an identical one is already there (idempotent); returns its python."""
    write_stubs()
    if _stamp().exists() and _stamp().read_text() == _stamp_text() and venv_python().exists():
        return venv_python()
    if not venv_python().exists():
        print(f"creating {VENV_DIR}", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV_DIR)
    _pip("install", "-q", "--upgrade", "pip")
    _pip("install", "-q", f"torch=={TORCH_VERSION}")
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    _pip("download", "-q", "--no-deps", "-d", str(WHEEL_DIR), f"llamafactory=={LLAMAFACTORY_VERSION}")
    wheel = WHEEL_DIR / f"llamafactory-{LLAMAFACTORY_VERSION}-py3-none-any.whl"
    # torch is re-stated as a pin so the resolver can never swap the CPU wheel for another build.
    _pip("install", "-q", f"torch=={TORCH_VERSION}", GRADIO_PIN, *wheel_requirements(wheel))
    _pip("install", "-q", "--no-deps", str(wheel))
    _stamp().write_text(_stamp_text())
    return venv_python()


if __name__ == "__main__":
    print(ensure_llamafactory_venv())
