"""LLaMA-Factory on the device machine, which reaches no package index: its pinned wheels are carried.

Here (with PyPI):   python bench/lf_device_env.py download [--dest .whl/lf]
    `pip download --no-deps` of PINS for the device's Python 3.12 / x86_64 into .whl/lf/ (checks < 40 MB).
There (no network): python bench/lf_device_env.py install [--wheels .whl/lf] [--target /tmp/lf]
    `pip install --no-deps --target` of every file (sdists with --no-build-isolation), a stub torchaudio
    only where the machine's own cannot be imported, and prints the PYTHONPATH to run LLaMA-Factory with
    (together with DISABLE_VERSION_CHECK=1, as bench/predict_throughput.py does). TUNESMITH_EXTRAS go to
    a second folder (--tunesmith-target, default /tmp/ts): what tunesmith needs there that the image lacks.

PINS: LLaMA-Factory 0.9.5 and the versions its bench venv resolved (bench/llamafactory_env.py), minus
what the device image already has at a version LLaMA-Factory accepts (pandas, xxhash, requests, aiohttp,
regex, joblib, click, rich, sentencepiece, tiktoken, ...; see the device's KINDS.md package list).
do_predict with predict_with_generate makes jieba, nltk and rouge_chinese mandatory (LLaMA-Factory's
parser checks them; its ComputeSimilarity uses them). fsspec is pinned because datasets 4.0.0 requires
fsspec <= 2025.3.0.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

PINS = (
    "llamafactory==0.9.5", "transformers==5.6.0", "tokenizers==0.22.2", "peft==0.18.1", "trl==0.24.0",
    "accelerate==1.11.0", "datasets==4.0.0", "dill==0.3.8", "multiprocess==0.70.16", "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3", "fire==0.7.1", "tyro==0.8.14", "docstring_parser==0.18.0",
    "shtab==1.13.0", "termcolor==3.3.0", "fsspec==2025.3.0",
    "jieba==0.42.1", "nltk==3.10.4", "rouge-chinese==1.0.3",
    "liger-kernel==0.8.5",  # enable_liger_kernel (its best flags in bench/train_throughput.py); triton is on the image
)  # fmt: skip
TUNESMITH_EXTRAS = ("orjson==3.13.0", "jieba==0.42.1")  # tunesmith's orjson; jieba for LLaMA-Factory's scores
MAX_MB = 40
DEVICE_TARGET = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                 "--abi", "none", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "any")  # fmt: skip
_STUB = '"""Stub: LLaMA-Factory text-only paths import torchaudio at module level but never call it."""\n'


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def _name(spec: str) -> str:
    return spec.split("==")[0].lower().replace("_", "-")


def download(dest: Path) -> float:
    """Fetch PINS and TUNESMITH_EXTRAS for the device; returns the folder's size in MB (fails above MAX_MB)."""
    dest.mkdir(parents=True, exist_ok=True)
    for spec in dict.fromkeys(PINS + TUNESMITH_EXTRAS):
        try:  # a wheel for the device's interpreter and platform
            _pip("download", "-q", "--no-deps", "--only-binary=:all:", *DEVICE_TARGET, "-d", str(dest), spec)
        except subprocess.CalledProcessError:  # sdist-only releases (jieba, rouge-chinese)
            _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(dest), spec)
    mb = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(f"{dest}: {len(list(dest.iterdir()))} files, {mb:.1f} MB", file=sys.stderr)
    if mb >= MAX_MB:
        raise SystemExit(f"{dest} holds {mb:.1f} MB, over the {MAX_MB} MB budget for carrying it")
    return mb


def _files_for(wheels: Path, specs: tuple[str, ...]) -> list[Path]:
    names = {_name(s).replace("-", "_") for s in specs}
    out = []
    for f in sorted(wheels.iterdir()):
        # wheel: name-version-tags.whl (name has no hyphen); sdist: name-version.tar.gz (name may have some)
        name = (
            f.name.split("-")[0] if f.suffix == ".whl" else f.name.removesuffix(".tar.gz").rsplit("-", 1)[0]
        )
        if name.lower().replace("-", "_").replace(".", "_") in names:
            out.append(f)
    return out


def _install(files: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    binaries = [str(f) for f in files if f.suffix == ".whl"]
    sdists = [str(f) for f in files if f.suffix != ".whl"]
    if binaries:
        _pip("install", "-q", "--no-deps", "--no-index", "--target", str(target), *binaries)
    if sdists:  # built with the machine's setuptools: there is no index to fetch build requirements from
        _pip(
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            *sdists,
        )


def install(wheels: Path, target: Path, tunesmith_target: Path) -> str:
    """Install the carried files; returns the PYTHONPATH for LLaMA-Factory (prints it too)."""
    _install(_files_for(wheels, PINS), target)
    _install(_files_for(wheels, TUNESMITH_EXTRAS), tunesmith_target)
    if not _importable("torchaudio"):
        (target / "torchaudio").mkdir(exist_ok=True)
        (target / "torchaudio" / "__init__.py").write_text(_STUB)
    print(target)
    return str(target)


def _importable(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="here: fetch the wheels into --dest")
    d.add_argument("--dest", type=Path, default=Path(".whl/lf"))
    i = sub.add_parser("install", help="on the device: install them, print the PYTHONPATH")
    i.add_argument("--wheels", type=Path, default=Path(".whl/lf"))
    i.add_argument("--target", type=Path, default=Path("/tmp/lf"))
    i.add_argument("--tunesmith-target", type=Path, default=Path("/tmp/ts"))
    a = p.parse_args()
    if a.cmd == "download":
        download(a.dest)
    else:
        install(a.wheels, a.target, a.tunesmith_target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
