"""Multiple-choice benchmarks on disk in the MMLU / CMMLU / C-Eval layouts: find them, read them.

A task ``NAME_SPLIT`` (``mmlu_test``, ``ceval_validation``) names a benchmark folder and a split. The
folder is ``<task_dir>/<NAME>``, else ``<task_dir>`` itself, else the bundled ``assets/eval/<NAME>``.
Inside it a split is a folder ``<split>/`` (or ``data/<split>/``, as the MMLU archive unpacks) of one
CSV per subject, named ``<subject>_<split>.csv`` (MMLU, C-Eval) or ``<subject>.csv`` (CMMLU). Rows are
question, A, B, C, D, answer: without a header (MMLU) or with one naming those columns in any case,
extra columns (id, explanation, a pandas index) ignored. ``mapping.json`` (LLaMA-Factory's shape,
``{subject: {"name": ..., "category": ...}}``) gives each subject its display name and category.
Pure file reading: no torch, no tokenizer.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import DataError, Location, TunesmithError

CHOICES = ("A", "B", "C", "D")
COLUMNS = ("question", *CHOICES, "answer")
DEFAULT_CATEGORY = "Other"  # LLaMA-Factory's mapping files spell their catch-all category this way
# Each split's accepted spellings, folder name first: LLaMA-Factory's tasks say "validation" and its
# few-shot split is the datasets "train" split, while the files say "val" and "dev".
SPLIT_NAMES = {"test": ("test",), "val": ("val", "validation"), "dev": ("dev", "train")}
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "eval"


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``index`` is its 0-based row in the split file."""

    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of CHOICES
    where: Location


@dataclass(frozen=True)
class Subject:
    key: str  # the file stem, e.g. "high_school_physics"
    name: str  # how prompts name it, e.g. "high school physics"
    category: str
    questions: tuple[Question, ...]
    shots: tuple[Question, ...]  # the dev split's questions, the k-shot pool in file order


@dataclass(frozen=True)
class Benchmark:
    name: str
    split: str  # the split folder's name: test, val or dev
    folder: Path
    subjects: tuple[Subject, ...]

    @property
    def num_questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


def parse_task(task: str) -> tuple[str, str]:
    """``"mmlu_test"`` -> ``("mmlu", "test")``; the split is the part after the last underscore."""
    name, sep, split = task.rpartition("_")
    canonical = next((k for k, names in SPLIT_NAMES.items() if split in names), None)
    if not sep or not name or canonical is None:
        allowed = ", ".join(n for names in SPLIT_NAMES.values() for n in names)
        raise TunesmithError(
            f"task: {task!r} is not BENCHMARK_SPLIT. The split after the last underscore must be one of "
            f"{allowed}. Fix: e.g. task: mmlu_test, cmmlu_test, ceval_validation, sample_test"
        )
    return name, canonical


def find_benchmark(task_dir: str | Path, name: str, split: str) -> tuple[Path, Path]:
    """(benchmark folder, split folder) of a benchmark; the error lists what exists."""
    root = Path(task_dir).expanduser()
    tried: list[Path] = []
    for folder in (root / name, root, BUNDLED / name):
        for base in (folder, folder / "data"):
            for spelling in SPLIT_NAMES[split]:
                tried.append(base / spelling)
                if (base / spelling).is_dir():
                    return folder, base / spelling
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    bundled = sorted(p.name for p in BUNDLED.iterdir() if p.is_dir())
    where = f"{root} holds: {', '.join(found) or 'no folders'}" if root.is_dir() else f"{root} does not exist"
    raise TunesmithError(
        f"task: no {split!r} split of benchmark {name!r}; looked for {', '.join(map(str, tried[:4]))} "
        f"and the bundled benchmarks. {where}; bundled: {', '.join(bundled)}. Fix: set task_dir to the "
        f"folder holding {name}/ (with {split}/<subject>_{split}.csv files), or use a bundled task such "
        "as sample_test"
    )


def read_mapping(folder: Path) -> dict[str, dict[str, str]]:
    """``mapping.json`` of a benchmark folder ({} when there is none), checked."""
    path = folder / "mapping.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(Location(str(path), e.lineno), f"not valid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(str(path), "must be an object", expected='{subject: {"name": ..., "category": ...}}')
    for subject, info in raw.items():
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("name", "category")):
            raise DataError(
                str(path),
                f"entry {subject!r} is {info!r}",
                field=subject,
                expected='{"name": str, "category": str}',
            )
    return raw


def subject_files(split_dir: Path) -> dict[str, Path]:
    """Subject -> CSV file of a split folder (``<subject>_<split>.csv`` or ``<subject>.csv``)."""
    suffix = f"_{split_dir.name}"
    return {p.stem.removesuffix(suffix): p for p in sorted(split_dir.glob("*.csv"))}


def read_questions(path: Path, subject: str) -> list[Question]:
    """The questions of one CSV file, with or without a header row; malformed rows name file and line."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows: list[tuple[int, list[str]]] = []
        line = 1
        for row in reader:
            rows.append((line, row))
            line = reader.line_num + 1  # a quoted cell may span lines: the next row starts after this one
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    if set(header) >= {c.lower() for c in COLUMNS}:
        positions = [header.index(c.lower()) for c in COLUMNS]
        rows = rows[1:]
    else:
        positions = list(range(len(COLUMNS)))
    return [_question(path, subject, i, line, row, positions) for i, (line, row) in enumerate(rows)]


def _question(
    path: Path, subject: str, index: int, line: int, row: list[str], positions: list[int]
) -> Question:
    where = Location(str(path), line, index)
    if len(row) <= max(positions):
        missing = [COLUMNS[k] for k, p in enumerate(positions) if p >= len(row)]
        raise DataError(
            where,
            f"row has {len(row)} columns; missing {', '.join(missing)}",
            expected="question, A, B, C, D, answer (a header row may name them in another order)",
        )
    question, a, b, c, d, answer = (row[p] for p in positions)
    answer = answer.strip().upper()
    if answer not in CHOICES:
        hidden = "; the answers of this split may be withheld (C-Eval's test split)" if not answer else ""
        raise DataError(
            where,
            f"answer is {row[positions[-1]]!r}{hidden}",
            field="answer",
            expected="one of A, B, C, D",
            fix="correct the row, or evaluate a split with answers (e.g. ceval_validation)",
        )
    if not question.strip():
        raise DataError(where, "the question is empty", field="question")
    return Question(subject, index, question, (a, b, c, d), answer, where)


def load_benchmark(task_dir: str | Path, task: str, *, n_shot: int) -> Benchmark:
    """Every subject of a task's split, with its dev-split shots when ``n_shot`` > 0."""
    name, split = parse_task(task)
    folder, split_dir = find_benchmark(task_dir, name, split)
    files = subject_files(split_dir)
    if not files:
        raise TunesmithError(
            f"{split_dir} holds no .csv files. Fix: put <subject>_{split_dir.name}.csv files there"
        )
    mapping = read_mapping(folder)
    missing = sorted(set(mapping) - set(files))
    if missing:
        raise DataError(
            str(folder / "mapping.json"),
            f"subjects without a file in {split_dir}: {', '.join(missing)}",
            fix="add their CSV files or remove them from mapping.json",
        )
    dev_files: dict[str, Path] = {}
    if n_shot > 0 and split != "dev":
        dev_dir = next(
            (b / s for b in (folder, folder / "data") for s in SPLIT_NAMES["dev"] if (b / s).is_dir()), None
        )
        if dev_dir is None:
            raise TunesmithError(
                f"n_shot: {n_shot} needs the dev split for examples, but {folder} has no dev/ folder. "
                "Fix: add dev/<subject>_dev.csv files, or set n_shot: 0"
            )
        dev_files = subject_files(dev_dir)
        absent = sorted(set(files) - set(dev_files))
        if absent:
            raise TunesmithError(
                f"n_shot: {n_shot}: no dev file in {dev_dir} for subject(s) {', '.join(absent)}. "
                "Fix: add them, or set n_shot: 0"
            )
    subjects = []
    for key, path in files.items():
        info = mapping.get(key, {"name": key.replace("_", " "), "category": DEFAULT_CATEGORY})
        questions = tuple(read_questions(path, key))
        if not questions:
            raise DataError(str(path), "holds no questions", fix="fill it or remove the file")
        shots = (
            questions if split == "dev" else tuple(read_questions(dev_files[key], key) if dev_files else ())
        )
        subjects.append(Subject(key, info["name"], info["category"], questions, shots))
    return Benchmark(name, split_dir.name, folder, tuple(subjects))
