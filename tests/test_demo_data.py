"""The demo task's data: shipped files match the generator, labels follow the rules, test is held out."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunesmith import demo_data
from tunesmith.data.load import BadRowPolicy, load_rows
from tunesmith.data.registry import load_dataset_info


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _team_patterns() -> dict[str, list[re.Pattern[str]]]:
    """Each issue template as a regex: slots match any of their values, the first letter either case."""
    out: dict[str, list[re.Pattern[str]]] = {}
    for team, templates in demo_data.ISSUES.items():
        out[team] = []
        for t in templates:
            rx = re.escape(t)
            for slot, values in demo_data.SLOTS.items():
                rx = rx.replace(re.escape("{" + slot + "}"), "(?:" + "|".join(map(re.escape, values)) + ")")
            end = "" if t.endswith("?") else "\\."
            out[team].append(re.compile(f"(?:^|[ ,])[{t[0].upper()}{t[0]}]{rx[1:]}{end}"))
    return out


def test_shipped_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    demo_data.write_demo_data(tmp_path)
    for name in ("train.jsonl", "test.jsonl", "dataset_info.json"):
        assert (tmp_path / name).read_bytes() == (demo_data.demo_data_dir() / name).read_bytes(), name


def test_splits_are_disjoint_and_sized() -> None:
    train, test = demo_data.make_splits()
    assert (len(train), len(test)) == (demo_data.TRAIN_ROWS, demo_data.TEST_ROWS)
    train_inputs = {r["input"] for r in train}
    assert len(train_inputs) == len(train)
    assert len({r["input"] for r in test}) == len(test)
    assert not train_inputs & {r["input"] for r in test}
    # Every label occurs in both splits, so test accuracy measures generalisation over new tickets.
    assert {r["output"] for r in train} == {r["output"] for r in test} and len(
        {r["output"] for r in test}
    ) == 8


def test_labels_follow_the_rules() -> None:
    patterns = _team_patterns()
    train, test = demo_data.make_splits()
    for row in train + test:
        teams = [t for t, rxs in patterns.items() if any(rx.search(row["input"]) for rx in rxs)]
        urgent = any(cue in row["input"] for cue in demo_data.URGENT)
        assert len(teams) == 1, row
        assert row["output"] == f"{teams[0]}, {'urgent' if urgent else 'normal'}", row


def test_other_seed_gives_other_rows() -> None:
    assert demo_data.make_splits(seed=1)[0] != demo_data.make_splits(seed=0)[0]


def test_registry_loads_the_shipped_files() -> None:
    root = demo_data.demo_data_dir()
    specs = load_dataset_info(root)
    assert sorted(specs) == ["demo_triage_test", "demo_triage_train"]
    rows = list(load_rows(specs["demo_triage_test"], dataset_dir=root, policy=BadRowPolicy()))
    first = _read(root / "test.jsonl")[0]
    assert len(rows) == demo_data.TEST_ROWS
    assert rows[0]["messages"] == [
        {"role": "user", "content": f"{first['instruction']}\n{first['input']}"},
        {"role": "assistant", "content": first["output"]},
    ]
