"""The data-throughput benchmark's harness: inputs, process-tree memory sampling, requirement filtering."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import data_throughput  # noqa: E402
import llamafactory_env  # noqa: E402


def _alpaca(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "src.json"
    src.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(n)]))
    return src


def test_replicate_rows_cycles_to_exact_count(tmp_path: Path) -> None:
    rows = _common.replicate_rows(_alpaca(tmp_path, 3), 7)
    assert [r["instruction"] for r in rows] == ["q0", "q1", "q2", "q0", "q1", "q2", "q0"]


def test_replicate_rows_rejects_non_array(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "x"}')
    with pytest.raises(ValueError, match="non-empty JSON array"):
        _common.replicate_rows(bad, 5)


def test_write_dataset_dir_registers_the_file(tmp_path: Path) -> None:
    rows = _common.replicate_rows(_alpaca(tmp_path, 2), 4)
    data_file = _common.write_dataset_dir(tmp_path / "d", rows)
    info = json.loads((tmp_path / "d" / "dataset_info.json").read_text())
    assert info == {_common.DATASET_NAME: {"file_name": data_file.name}}
    assert json.loads(data_file.read_text()) == rows


_CHILD = """
import json, multiprocessing as mp, time
def hold():
    block = bytearray(200 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(0.6)
if __name__ == "__main__":
    p = mp.get_context("fork").Process(target=hold)
    p.start(); p.join()
    print("noise line")
    print(json.dumps({"ok": 1}))
"""


def test_measure_subprocess_sums_rss_over_descendants(tmp_path: Path) -> None:
    m = _common.measure_subprocess([sys.executable, "-c", _CHILD], env={}, cwd=tmp_path)
    assert m.result == {"ok": 1}
    assert m.peak_tree_procs >= 2  # the worker was seen next to its parent
    assert m.peak_tree_rss_bytes >= 200 * 1024 * 1024
    assert m.samples >= 5


def test_measure_subprocess_reports_failure_with_stderr(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom here'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited 3:\nboom here"):
        _common.measure_subprocess(cmd, env={}, cwd=tmp_path)


def test_wheel_requirements_drops_torch_family_extras_and_gradio(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    meta = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: pkg",
            "Requires-Dist: transformers<=5.6.0,>=4.55.0",
            "Requires-Dist: torch>=2.4.0",
            "Requires-Dist: torchaudio>=2.4.0",
            "Requires-Dist: torchvision>=0.19.0",
            "Requires-Dist: gradio<=5.50.0,>=4.38.0",
            "Requires-Dist: Sentence_Piece",
            'Requires-Dist: deepspeed>=0.10; extra == "deepspeed"',
        ]
    )
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg-1.0.dist-info/METADATA", meta)
    assert llamafactory_env.wheel_requirements(wheel) == ["transformers<=5.6.0,>=4.55.0", "Sentence_Piece"]


def test_token_check_pairs_sides_and_gives_ratio() -> None:
    recs = [
        {"case": "c", "workers": 1, "side": "llamafactory", "input_tokens": 100, "supervised_tokens": 40,
         "input_ids_sha1": "a"},
        {"case": "c", "workers": 1, "side": "tunesmith", "input_tokens": 102, "supervised_tokens": 41,
         "input_ids_sha1": "b"},
        {"case": "c", "workers": 2, "side": "llamafactory", "input_tokens": 100, "supervised_tokens": 40,
         "input_ids_sha1": "a"},
        {"case": "c", "workers": 2, "side": "tunesmith", "input_tokens": 100, "supervised_tokens": 40,
         "input_ids_sha1": "a"},
        {"case": "c", "workers": 4, "side": "llamafactory", "input_tokens": 100, "supervised_tokens": 40},
    ]  # fmt: skip
    out = data_throughput.token_check(recs)
    assert out[0]["input_tokens_ratio_ts_over_lf"] == pytest.approx(1.02)
    assert out[0]["input_ids_identical"] is False
    assert out[1]["input_ids_identical"] is True
    assert out[2] == {
        "case": "c",
        "workers": 4,
        "llamafactory_input_tokens": 100,
        "llamafactory_supervised_tokens": 40,
        "llamafactory_input_ids_sha1": None,
    }
