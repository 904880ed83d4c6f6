"""`make demo` end to end: the bundled tiny model learns the triage task on CPU (0% -> >= 80% exact match)."""

from __future__ import annotations

from tunesmith.demo import main


def test_demo_learns(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "before training: held-out exact match 0.0%" in out
    assert "after training: held-out exact match" in out
    assert (tmp_path / "demo" / "triage-full" / "training_loss.png").exists()
