"""`tunesmith predict` on a reward model (stage: rm) writes chosen/rejected scores per pair, resumably."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

import tunesmith
from tests.training.helpers import run_config

INFO = {
    "pairs": {
        "file_name": "pairs.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
    },
    "held_out": {
        "file_name": "held_out.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
    },
}


def _pairs(cities: tuple[str, ...], n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"Question {offset + i}: tell me about {cities[i % len(cities)]}.",
            "chosen": f"{cities[i % len(cities)]} is lovely.",
            "rejected": f"{cities[i % len(cities)]} is awful.",
        }
        for i in range(n)
    ]


def _cfg(model: Path, root: Path, out: Path, **over) -> tunesmith.Config:
    keys = run_config(model, root / "pairs.json", out, stage="rm", dataset="pairs", dataset_dir=str(root))
    keys |= {"finetuning_type": "full", "learning_rate": 1e-3, "max_steps": 12, **over}
    return tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()])


def test_a_reward_model_scores_held_out_pairs_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "pairs.json").write_text(json.dumps(_pairs(("Paris", "Rome", "Oslo", "Lima"), 24)))
    (root / "held_out.json").write_text(json.dumps(_pairs(("Tokyo", "Cairo", "Quito", "Delhi"), 8, 100)))
    (root / "dataset_info.json").write_text(json.dumps(INFO))
    rm_dir = tmp_path / "rm"
    # do_predict after training scores the eval pairs with the model just saved
    tunesmith.run(_cfg(tiny_model_dir, root, rm_dir, eval_dataset="held_out", do_predict=True))
    lines = [orjson.loads(x) for x in (rm_dir / "predictions.jsonl").read_bytes().splitlines()]
    assert len(lines) == 8 and len({r["id"] for r in lines}) == 8
    assert all(r["margin"] == r["chosen_score"] - r["rejected_score"] for r in lines)
    assert sum(r["chosen_preferred"] for r in lines) / len(lines) >= 0.75  # above chance on new cities

    # predict on its own (the CLI path): resumes, drops a torn line, never duplicates an id
    from tunesmith.infer.predict import predict

    out = tmp_path / "scores"
    cfg = _cfg(rm_dir, root, out, eval_dataset="held_out", model_name_or_path=str(rm_dir))
    predict(cfg)
    first = (out / "predictions.jsonl").read_bytes()
    kept = b"".join(first.splitlines(keepends=True)[:3]) + b'{"id": "held_out#3", "chosen_sc'
    (out / "predictions.jsonl").write_bytes(kept)
    summary = predict(cfg)
    assert summary.skipped == 3 and summary.pairs == 5
    again = [orjson.loads(x) for x in (out / "predictions.jsonl").read_bytes().splitlines()]
    before = [orjson.loads(x) for x in first.splitlines()]
    assert [r["id"] for r in again] == [r["id"] for r in before]  # every id once, in data order
    # another batch shape (5 rows instead of 8) changes the float sums slightly, nothing more
    assert all(abs(a["margin"] - b["margin"]) < 1e-4 for a, b in zip(again, before))
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta["summary"]["pairs"] == 8 and meta["summary"]["accuracy"] >= 0.75
