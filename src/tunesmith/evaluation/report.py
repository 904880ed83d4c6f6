"""What an evaluation found: scores per subject and category, or perplexity; the saved JSON and a table.

``save_dir`` gets ``results.json`` (and, for benchmarks, ``predictions.jsonl``: one line per question
with its choice probabilities). An existing ``results.json`` with the same content is left as it is (a
rerun), one with different content is never overwritten: the error says to pick another save_dir or
delete it. LLaMA-Factory refuses any existing save_dir; a rerun of the same evaluation is harmless here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.evaluation.perplexity import NLL

RESULTS = "results.json"
PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class Score:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 6), "correct": self.correct, "total": self.total}


@dataclass(frozen=True)
class Prediction:
    subject: str
    index: int  # the question's 0-based row in its split file
    prediction: str
    answer: str
    probs: tuple[float, ...]  # softmax over the choice letters' logits, A first
    shots: int

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "index": self.index,
            "prediction": self.prediction,
            "answer": self.answer,
            "correct": self.prediction == self.answer,
            "probs": dict(zip("ABCD", (round(p, 6) for p in self.probs))),
            "shots": self.shots,
        }


@dataclass(frozen=True)
class SubjectInfo:
    key: str
    name: str
    category: str


@dataclass(frozen=True)
class ChoiceReport:
    """Accuracy of a multiple-choice benchmark per subject, per category and overall (question-weighted)."""

    task: str
    setup: dict[str, Any]  # model, template, split, n_shot, lang, cutoff_len, benchmark folder
    subjects: tuple[SubjectInfo, ...]
    predictions: tuple[Prediction, ...]
    shots_dropped: int = 0  # questions that got fewer shots than n_shot to fit cutoff_len
    tokens_cut: int = 0  # questions whose 0-shot prompt was still too long and lost its first tokens
    save_dir: Path | None = field(default=None, compare=False)

    def subject_scores(self) -> dict[str, Score]:
        hits: dict[str, list[bool]] = {s.key: [] for s in self.subjects}
        for p in self.predictions:
            hits[p.subject].append(p.prediction == p.answer)
        return {k: Score(sum(v), len(v)) for k, v in hits.items()}

    def category_scores(self) -> dict[str, Score]:
        per = self.subject_scores()
        sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s in self.subjects:
            sums[s.category][0] += per[s.key].correct
            sums[s.category][1] += per[s.key].total
        return {c: Score(*sums[c]) for c in sorted(sums)}

    @property
    def overall(self) -> Score:
        return Score(sum(p.prediction == p.answer for p in self.predictions), len(self.predictions))

    def to_json(self) -> dict[str, Any]:
        per = self.subject_scores()
        return {
            "task": self.task,
            **self.setup,
            "average": self.overall.to_json(),
            "categories": {c: s.to_json() for c, s in self.category_scores().items()},
            "subjects": {
                s.key: {"name": s.name, "category": s.category, **per[s.key].to_json()} for s in self.subjects
            },
            "shots_dropped": self.shots_dropped,
            "tokens_cut": self.tokens_cut,
        }

    def summary(self) -> str:
        """A table of accuracy (%) per subject, per category and the average."""
        per = self.subject_scores()
        width = max([len("Average"), *(len(s.key) for s in self.subjects), *map(len, self.category_scores())])
        head = f"{self.task}: {len(self.subjects)} subjects, {self.overall.total} questions, "
        head += f"{self.setup['n_shot']}-shot, lang {self.setup['lang']}, template {self.setup['template']}"
        lines = [head, f"{'subject':<{width}}  {'category':<16} {'correct':>7} {'total':>6} {'acc %':>7}"]
        for s in self.subjects:
            sc = per[s.key]
            lines.append(
                f"{s.key:<{width}}  {s.category:<16} {sc.correct:>7} {sc.total:>6} {100 * sc.accuracy:>7.2f}"
            )
        lines.append("")
        for c, sc in [*self.category_scores().items(), ("Average", self.overall)]:
            lines.append(f"{c:<{width}}  {'':<16} {sc.correct:>7} {sc.total:>6} {100 * sc.accuracy:>7.2f}")
        if self.shots_dropped or self.tokens_cut:
            lines.append(
                f"cutoff_len: {self.shots_dropped} question(s) got fewer shots, "
                f"{self.tokens_cut} lost their first tokens"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class PerplexityReport:
    """Token-weighted mean NLL and perplexity of the supervised tokens of a dataset."""

    task: str
    setup: dict[str, Any]  # model, template, datasets, stage, cutoff_len
    nll: NLL
    save_dir: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            **self.setup,
            "samples": self.nll.samples,
            "tokens": self.nll.tokens,
            "nll_sum": round(self.nll.nll_sum, 6),
            "mean_nll": round(self.nll.mean_nll, 6),
            "perplexity": round(self.nll.perplexity, 6),
        }

    def summary(self) -> str:
        n = self.nll
        return (
            f"perplexity of {', '.join(self.setup['datasets'])} ({self.setup['stage']}): {n.perplexity:.4f} "
            f"(mean NLL {n.mean_nll:.4f} over {n.tokens} tokens of {n.samples} samples)"
        )


EvalReport = ChoiceReport | PerplexityReport


def save_report(report: EvalReport, save_dir: str | Path) -> Path:
    """Write results.json (+ predictions.jsonl) into save_dir; never replaces different results."""
    folder = Path(save_dir).expanduser()
    text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    target = folder / RESULTS
    if target.exists():
        if target.read_text(encoding="utf-8") == text:
            return folder
        raise TunesmithError(
            f"save_dir: {folder} already holds a results.json with different results; it is not overwritten. "
            "Fix: set save_dir to a new folder, or delete the old one"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(report, ChoiceReport):
        lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in report.predictions]
        (folder / PREDICTIONS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    # results.json last: its presence says the folder is complete.
    target.write_text(text, encoding="utf-8")
    return folder
