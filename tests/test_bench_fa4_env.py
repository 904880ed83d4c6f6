"""bench/fa4_device_env.py: a wheel split into two carries and put back together, with the other wheels."""

import os
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fa4_device_env  # noqa: E402


def _wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_split_then_install_gives_back_every_file(tmp_path):
    big = _wheel(tmp_path / "big-1.0-cp312-cp312-linux_x86_64.whl", {
        "pkg/dsl_packages/cutlass/_mlir/_lib.so": os.urandom(50_000),  # incompressible: both parts hold some
        "pkg/dsl_packages/cutlass/_mlir/version.py": "V = 1\n",
    })  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    size = fa4_device_env.split_wheel(big, a, b, part1_bytes=20_000)
    assert (a / "part1").stat().st_size == 20_000
    assert (a / "part1").stat().st_size + (b / "part2").stat().st_size == size
    _wheel(b / "core-1.0-py3-none-any.whl", {"pkg/dsl_packages/cutlass/__init__.py": "X = 2\n"})
    target = tmp_path / "site"
    fa4_device_env.install(a / "part1", b, target)
    lib = target / "pkg/dsl_packages/cutlass/_mlir/_lib.so"
    with zipfile.ZipFile(big) as z:
        assert lib.read_bytes() == z.read("pkg/dsl_packages/cutlass/_mlir/_lib.so")
    assert os.access(lib, os.X_OK)
    # the other wheel merged into the same package folder
    assert (target / "pkg/dsl_packages/cutlass/__init__.py").read_text() == "X = 2\n"
    assert (target / "pkg/dsl_packages/cutlass/_mlir/version.py").read_text() == "V = 1\n"
