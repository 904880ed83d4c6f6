"""FlashAttention-4 (flash-attn-4 and NVIDIA's CuTe DSL) for the device, in two carries of under 64 MiB.

The DSL's CUDA 13 library wheel is 92 MB (64 MB as tar.xz), more than one call may carry. `download` fetches
the wheels for the device (CPython 3.12, x86-64) and writes the library's contents as one tar.xz split in two:
``DEST/a/part1`` (carry in a first call, which copies it to /tmp, where it stays while the machine is warm),
and ``DEST/b/`` with part 2 and the other wheels (carry in the next call, within the 30 s the machine stays
warm). `install` joins the parts and unpacks everything into one folder; wheels are unzipped into it rather
than pip-installed, since `pip --target` will not merge into a package folder that exists. Then
``PYTHONPATH=TARGET:TARGET/nvidia_cutlass_dsl/dsl_packages`` (the DSL's .pth file, which pip would run).

    python bench/fa4_device_env.py download --dest .fa4                       # here
    # call 1, carry .fa4/a:  mkdir -p /tmp/fa4parts && cp .fa4/a/part1 /tmp/fa4parts/
    # call 2, carry .fa4/b:  python3 bench/fa4_device_env.py install --part1 /tmp/fa4parts/part1 --dir .fa4/b
"""

from __future__ import annotations

import argparse
import io
import lzma
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lf_device_env import DEVICE_TARGET, _pip  # bench/ is on sys.path when run as a script

CUTLASS = "4.8.1"
SPECS = (
    "flash-attn-4==4.0.0b36",
    f"nvidia-cutlass-dsl=={CUTLASS}",
    f"nvidia-cutlass-dsl-libs-base=={CUTLASS}",
    f"nvidia-cutlass-dsl-libs-core=={CUTLASS}",
    "quack-kernels==0.6.5",
    "apache-tvm-ffi==0.1.15.post2",
    "torch-c-dlpack-ext==0.1.5",
)  # fmt: skip  (einops, cuda-bindings, protobuf, typing-extensions: on the device image)
BIG = f"nvidia-cutlass-dsl-libs-cu13=={CUTLASS}"
PART1_BYTES = 45_000_000


def _download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    _pip("download", "-q", "--no-deps", "--pre", "--only-binary=:all:", *DEVICE_TARGET, "-d", str(dest), spec)
    new = set(dest.glob("*.whl")) - before
    return new.pop() if new else next(dest.glob(spec.split("==")[0].replace("-", "_") + "-*.whl"))


def split_wheel(wheel: Path, a: Path, b: Path, part1_bytes: int = PART1_BYTES) -> int:
    """The wheel's files as one tar.xz: the first ``part1_bytes`` to ``a/part1``, the rest to ``b/part2``;
    returns the tar.xz's size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buf, mode="w:xz", preset=9) as tar:
        for info in z.infolist():
            if info.is_dir():
                continue
            data = z.read(info)
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(member, io.BytesIO(data))
    blob = buf.getvalue()
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    (a / "part1").write_bytes(blob[:part1_bytes])
    (b / "part2").write_bytes(blob[part1_bytes:])
    return len(blob)


def install(part1: Path, folder: Path, target: Path) -> None:
    """part1 + folder/part2 unpacked into ``target``, then every wheel of ``folder`` unzipped into it."""
    target.mkdir(parents=True, exist_ok=True)
    joined = part1.read_bytes() + (folder / "part2").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(joined)), mode="r:") as tar:
        tar.extractall(target, filter="data")
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("--dest", type=Path, default=Path(".fa4"))
    i = sub.add_parser("install")
    i.add_argument("--part1", type=Path, required=True)
    i.add_argument("--dir", type=Path, required=True, help="the second carry: part2 and the wheels")
    i.add_argument("--target", type=Path, default=Path("/tmp/fa4site"))
    a = p.parse_args(argv)
    if a.cmd == "install":
        install(a.part1, a.dir, a.target)
        print(f"PYTHONPATH={a.target}:{a.target}/nvidia_cutlass_dsl/dsl_packages")
        return 0
    first, second = a.dest / "a", a.dest / "b"
    second.mkdir(parents=True, exist_ok=True)
    for spec in SPECS:
        _download(spec, second)
    with tempfile.TemporaryDirectory() as tmp:
        size = split_wheel(_download(BIG, Path(tmp)), first, second)
    mb = {f.name: sum(x.stat().st_size for x in f.iterdir()) / 2**20 for f in (first, second)}
    print(
        f"{BIG}: {size / 2**20:.1f} MiB as tar.xz; carry {first} ({mb['a']:.1f} MiB), then {second} ({mb['b']:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
