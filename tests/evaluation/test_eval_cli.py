"""`tunesmith eval` on the command line: the bundled sample benchmark, its table on stdout."""

from __future__ import annotations

import json

from tunesmith.cli import main


def test_eval_command_scores_the_bundled_benchmark(capsys, tiny_model_dir, tmp_path):
    args = [f"model_name_or_path={tiny_model_dir}", "template=qwen", "task=sample_test", "n_shot=2"]
    code = main(["eval", *args, f"save_dir={tmp_path / 'eval'}"])
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for subject in ("arithmetic", "geography"):
        assert subject in json.dumps(results) and subject in stdout.lower()


def test_eval_command_with_an_unknown_task_lists_what_exists(capsys, tiny_model_dir):
    code = main(["eval", f"model_name_or_path={tiny_model_dir}", "template=qwen", "task=nosuch_test"])
    err = capsys.readouterr().err
    assert code == 2 and "nosuch" in err
