"""`tunesmith check` through the real CLI: LLaMA-Factory's demo data, and bad inputs."""

from __future__ import annotations

import json
import re

import pytest

from tunesmith.cli import main
from tunesmith.tiny import tiny_tokenizer_dir

TINY = str(tiny_tokenizer_dir())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("dataset", "stage"),
    [
        ("alpaca_en_demo", "sft"),
        ("glaive_toolcall_en_demo", "sft"),
        ("dpo_en_demo", "dpo"),
        ("kto_en_demo", "kto"),
        ("identity", "sft"),
        ("c4_demo", "pt"),
    ],
)
def test_check_llamafactory_demo_data(capsys, lf_data, dataset, stage):
    code, out, err = run_cli(
        capsys,
        "check",
        f"model_name_or_path={TINY}",
        f"dataset={dataset}",
        f"stage={stage}",
        f"dataset_dir={lf_data}",
        "template=qwen",
        "cutoff_len=1024",
        "max_samples=200",
    )
    assert code == 0, out + err
    assert "usable: yes" in out
    assert "== samples (as the model sees them) ==" in out and "-- sample 1" in out
    assert re.search(r"total\s+\d+\s+\d+\s+\d+\s+\d+", out), out  # p50 p90 p99 max
    if stage != "pt":
        assert "⟦" in out and "⟧" in out  # supervised tokens are marked (no colour: not a TTY)
        assert "<|im_start|>assistant" in out
    if stage == "dpo":
        assert "chosen:" in out and "rejected:" in out
    if dataset == "glaive_toolcall_en_demo":
        assert "<tools>" in out  # tools rendered into the system prompt


def test_check_colour_marks_supervised_tokens(tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.check import highlight

    tok = AutoTokenizer.from_pretrained(TINY)
    ids = tok.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>", add_special_tokens=False
    )
    labels = [-100] * len(ids)
    yo = tok.encode("yo<|im_end|>", add_special_tokens=False)
    labels[-len(yo) :] = yo
    plain = highlight(tok, ids, labels, colour=False)
    assert plain.endswith("⟦yo<|im_end|>⟧")
    coloured = highlight(tok, ids, labels, colour=True)
    assert "\x1b[1;32myo<|im_end|>\x1b[0m" in coloured


def _write(path, text: bytes | str) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        (
            "truncated.json",
            '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "outp',
            [r"truncated\.json:3", "cut off"],
        ),
        ("empty.json", "", [r"empty\.json", "no records"]),
        (
            "latin1.jsonl",
            b'{"instruction": "caf\xe9", "output": "x"}\n',
            [r"latin1\.jsonl:1", "UTF-8", "iconv"],
        ),
        (
            "allmissing.jsonl",
            '{"instruction": "a"}\n{"instruction": "b"}\n',
            [r"allmissing\.jsonl:1", "'output'", "missing"],
        ),
        (
            "allroles.jsonl",
            '{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}\n',
            [r"allroles\.jsonl:1", r"conversations\[0\]", "assistant turn at position 0"],
        ),
    ],
)
def test_bad_inputs_name_file_line_field_without_traceback(capsys, tmp_path, name, content, expect):
    _write(tmp_path / name, content)
    # registered in dataset_info.json (alpaca needs instruction+output; sharegpt conversations)
    fmt = {"formatting": "sharegpt"} if name == "allroles.jsonl" else {}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": name, **fmt}}))
    code, out, err = run_cli(
        capsys,
        "check",
        f"model_name_or_path={TINY}",
        "dataset=mine",
        f"dataset_dir={tmp_path}",
        "template=qwen",
    )
    assert code != 0
    assert "Traceback" not in out + err
    for pattern in expect:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"


@pytest.mark.parametrize(
    ("content", "reason", "where"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{"instruction": "d", "output": "e"}\n',
            "missing_column",
            r":2 \(record 1\): field 'output'",
        ),
        (
            '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
            '{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}\n'
            '{"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}\n',
            "bad_role_order",
            r":2 \(record 1\): field 'conversations\[0\]'",
        ),
    ],
)
def test_some_bad_rows_are_skipped_with_reasons(capsys, tmp_path, content, reason, where):
    path = _write(tmp_path / "data.jsonl", content)
    code, out, err = run_cli(
        capsys, "check", f"model_name_or_path={TINY}", f"dataset={path}", "template=qwen"
    )
    assert code == 0, out + err
    assert "2 valid, 1 invalid" in out
    assert reason in out and re.search(where, out)


def test_strict_mode_fails_on_first_bad_row(capsys, tmp_path):
    path = _write(tmp_path / "data.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    code, _, err = run_cli(capsys, "check", f"model_name_or_path={TINY}", f"dataset={path}", "bad_rows=fail")
    assert code != 0 and re.search(r"data\.jsonl:2", err) and "'output'" in err


def test_config_errors_are_reported_together(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name_or_path: x\nlora_rnk: 8\ncutoff_len: -1\nstage: sftt\n")
    code, _, err = run_cli(capsys, "check", str(cfg))
    assert code == 2 and "Traceback" not in err
    assert "lora_rnk" in err and "lora_rank" in err  # unknown key with its closest valid key
    assert "cutoff_len" in err and "stage" in err and "cfg.yaml" in err


def test_warns_when_targets_lack_eos(capsys, tmp_path):
    rows = [{"instruction": f"q{i}", "output": "word " * 200} for i in range(4)]
    path = _write(tmp_path / "long.json", json.dumps(rows))
    code, out, _ = run_cli(
        capsys, "check", f"model_name_or_path={TINY}", f"dataset={path}", "template=chatml", "cutoff_len=64"
    )
    assert code == 0
    assert "4 of 4 training targets do not end with a stop token" in out


def test_check_reuses_cache_on_second_run(capsys, tmp_path, lf_data):
    args = (
        "check",
        f"model_name_or_path={TINY}",
        "dataset=identity",
        f"dataset_dir={lf_data}",
        "template=qwen",
    )
    assert run_cli(capsys, *args)[0] == 0
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "data cache: reused" in out and "reusing tokenized data from cache" in err


def test_default_system_replaces_the_templates(capsys, tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"instruction": "q", "output": "a"}\n')
    code, out, _ = run_cli(
        capsys,
        "check",
        f"model_name_or_path={TINY}",
        f"dataset={path}",
        "template=qwen",
        "default_system=You route tickets.",
    )
    assert code == 0 and "<|im_start|>system\nYou route tickets.<|im_end|>" in out


def test_export_quantization_bit_is_checked_at_load(capsys, tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"instruction": "q", "output": "a"}\n')
    code, _, err = run_cli(
        capsys, "check", f"model_name_or_path={TINY}", f"dataset={path}", "export_quantization_bit=3"
    )
    assert code == 2 and "export_quantization_bit" in err and "use 4 or 8" in err


def test_streaming_is_refused_as_unsupported(capsys):
    code, _, err = run_cli(capsys, "check", f"model_name_or_path={TINY}", "dataset=x", "streaming=true")
    assert code == 2 and "streaming" in err and "not supported by tunesmith yet" in err
