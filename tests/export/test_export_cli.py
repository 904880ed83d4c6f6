"""`tunesmith export` on the command line: the summary on stdout, config problems as one error (exit 2)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.cli import main


def test_export_command_writes_the_folder_and_prints_the_checks(
    capsys, tiny_model_dir, trained_lora, tmp_path
):
    out = tmp_path / "export"
    args = [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={trained_lora}", "template=qwen"]
    code = main(["export", *args, f"export_dir={out}", "export_check_max_new_tokens=8"])
    stdout = capsys.readouterr().out
    assert code == 0 and stdout.startswith(f"export complete: {out}")
    assert "logits vs base + adapter: PASS" in stdout and "reload with plain transformers: PASS" in stdout
    assert {"config.json", "model.safetensors", "Modelfile", "README.md", "export_report.json"} <= {
        p.name for p in Path(out).iterdir()
    }


def test_export_command_without_export_dir_names_the_key(capsys, tiny_model_dir):
    code = main(["export", f"model_name_or_path={tiny_model_dir}", "template=qwen"])
    err = capsys.readouterr().err
    assert code == 2 and "export_dir" in err and "tunesmith export: error" in err
