"""The bundled demo task: support-ticket triage (team and priority) as alpaca rows, generated with a seed.

A customer ticket goes in, "<team>, <priority>" comes out: the team follows from what the customer
asks about (billing, shipping, technical, account), the priority from an urgency cue. Held-out test
tickets are inputs that never occur in train. Regenerate the shipped files with
`python -m tunesmith.demo_data` (pure Python, same bytes on every machine).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Route this support ticket. Reply with: team, priority."
TRAIN_ROWS = 1000
TEST_ROWS = 150
SEED = 0

# What the customer asks about decides the team; slots ({item}, {amount}, ...) vary the wording.
ISSUES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for {plan}",
        "my invoice shows {amount} but I paid less",
        "please refund {amount} to my card",
        "the discount code was not applied to my bill",
        "my card was declined when paying for {plan}",
        "I need a receipt for my payment of {amount}",
        "why did the price of {plan} go up?",
        "cancel my subscription and stop billing me",
    ),
    "shipping": (
        "my package with the {item} never arrived",
        "the parcel is {days} days late",
        "the {item} came in a damaged box",
        "tracking for order {order} has not moved",
        "I got the wrong item instead of the {item}",
        "can I change the delivery address for order {order}?",
        "the courier lost my {item}",
        "when will order {order} be delivered?",
    ),
    "technical": (
        "the app crashes when I open {screen}",
        "I get error {code} on the login page",
        "the website is very slow on {screen}",
        "sync stopped working after the update",
        "the export button on {screen} does nothing",
        "the update broke my settings",
        "notifications do not show on my phone",
        "error {code} appears when I upload a file",
    ),
    "account": (
        "I forgot my password",
        "please delete my account",
        "I cannot change my email address",
        "my account is locked after {days} tries",
        "how do I add a second user to my account?",
        "I want to change my username",
        "the two factor code never comes",
        "please merge my two accounts",
    ),
}
URGENT = (
    "This is urgent!",
    "Please fix it today.",
    "ASAP please.",
    "We are blocked right now.",
    "I need this solved within the hour.",
    "Urgent: our launch is tomorrow.",
)
NORMAL = (
    "No rush.",
    "Whenever you have time.",
    "It can wait until next week.",
    "Not urgent.",
    "",
    "",
)
OPENERS = ("Hi,", "Hello team,", "Hey,", "Good morning,", "Dear support,", "")
CLOSERS = ("Thanks.", "Regards, {name}.", "Cheers, {name}", "Thank you, {name}.", "", "")
NAMES = ("Ann", "Bob", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Leo")
SLOTS: dict[str, tuple[str, ...]] = {
    "plan": ("the Pro plan", "the Basic plan", "my yearly plan", "the Team plan"),
    "amount": ("$12", "$49", "$99", "$250", "$7.50", "$30"),
    "item": ("lamp", "headphones", "blue chair", "keyboard", "coffee grinder", "desk"),
    "order": tuple(str(n) for n in range(4100, 4160, 7)),
    "days": ("two", "three", "five", "ten"),
    "screen": ("the dashboard", "the reports page", "settings", "the calendar"),
    "code": ("404", "500", "E17", "403"),
}


def make_row(rng: random.Random) -> dict[str, str]:
    """One alpaca row: a ticket built from a team issue, an optional urgency cue and small talk."""
    team = rng.choice(sorted(ISSUES))
    urgent = rng.random() < 0.5
    issue = rng.choice(ISSUES[team]).format(**{k: rng.choice(v) for k, v in SLOTS.items()})
    cue = rng.choice(URGENT if urgent else NORMAL)
    closer = rng.choice(CLOSERS).format(name=rng.choice(NAMES))
    opener = rng.choice(OPENERS)
    # After "Hi," the sentence goes on in lower case; without a greeting it starts the ticket.
    sentence = (issue if opener else issue[0].upper() + issue[1:]) + ("" if issue.endswith("?") else ".")
    ticket = " ".join(p for p in (opener, sentence, cue, closer) if p)
    return {
        "instruction": INSTRUCTION,
        "input": ticket,
        "output": f"{team}, {'urgent' if urgent else 'normal'}",
    }


def make_splits(
    seed: int = SEED, train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test rows with distinct tickets: no test input occurs in train (or twice in test)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict[str, str]]] = [[], []]
    for rows, size in zip(splits, (test_rows, train_rows)):
        while len(rows) < size:
            row = make_row(rng)
            if row["input"] not in seen:
                seen.add(row["input"])
                rows.append(row)
    test, train = splits
    return train, test


def dataset_info() -> dict[str, dict[str, object]]:
    """The LLaMA-Factory dataset_info.json entries for the two demo files."""
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    return {
        f"demo_triage_{split}": {"file_name": f"{split}.jsonl", "formatting": "alpaca", "columns": columns}
        for split in ("train", "test")
    }


def write_demo_data(out_dir: str | Path, seed: int = SEED) -> Path:
    """Write train.jsonl, test.jsonl and dataset_info.json into out_dir (the README is hand-written)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(seed)
    for name, rows in (("train", train), ("test", test)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    (out / "dataset_info.json").write_text(json.dumps(dataset_info(), indent=2) + "\n", encoding="utf-8")
    return out


def demo_data_dir() -> Path:
    """The shipped demo data folder."""
    return Path(__file__).parent / "assets" / "demo"


if __name__ == "__main__":
    print(write_demo_data(demo_data_dir()))
