"""Reward functions of stage grpo (and ppo without a reward model): built-ins and the user's own.

Every reward function is called as ``f(completions: list[str], **columns) -> list[float]``: one float per
completion. ``columns`` holds, per completion (repeated over the generations of one prompt), every extra
column of the user's data, ``prompt_text``, ``label_text`` (the row's trailing assistant turn, "" when none)
and ``completion_tokens`` (token count of each completion). A user function is named ``module:function``
(importable from the working directory or PYTHONPATH) and should accept ``**kwargs`` for the columns it
does not use.

Built-ins:
- ``exact_match``: 1.0 when the completion's final answer equals the row's reference answer (the
  ``answer_column``, else label_text), both extracted and normalised by `extract_answer`, else 0.0;
- ``format``: 1.0 when the whole completion matches ``reward_format_pattern`` (default: a
  ``<think>...</think><answer>...</answer>`` structure), else 0.0;
- ``length``: 0 up to ``reward_length_target`` tokens, then ``-(tokens - target) / target``.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

RewardFn = Callable[..., Sequence[float]]
DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
BUILTINS = ("exact_match", "format", "length")

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")
_ANSWER_MARK = re.compile(r"answer\s*(?:is)?\s*[:：]", re.IGNORECASE)


@dataclass(frozen=True)
class RewardFunc:
    """A named reward function and its weight in the summed reward."""

    name: str
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True)
class RewardOptions:
    """What the built-ins read from the config."""

    answer_column: str = "answer"
    format_pattern: str = DEFAULT_FORMAT_PATTERN
    length_target: int = 512


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the answer was cut off


def _normalise(answer: str) -> str:
    """Lower case, no surrounding space/punctuation/$, one space between words; numbers canonical."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.rstrip(".。!").strip().strip("\"'`*").strip()
    number = s.replace("$", "").replace(",", "").removesuffix("%").strip()
    if _NUMBER.fullmatch(number):
        value = float(number)
        return str(int(value)) if value.is_integer() else repr(value)
    return " ".join(s.lower().split())


def extract_answer(text: str) -> str:
    """The final answer of a completion, normalised: \\boxed{}, else after the last ``####``, else after
    the last "answer:" / "answer is:", else the last number, else the whole text.

    Example: ``extract_answer("so 1,000 + 2 = **1,002**.")`` -> ``"1002"``.
    """
    boxed = _boxed(text)
    if boxed is not None:
        return _normalise(boxed)
    tail = None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
    elif marks := list(_ANSWER_MARK.finditer(text)):
        tail = text[marks[-1].end() :].strip()
    if tail is not None:
        return _normalise(tail.splitlines()[0] if tail else "")
    numbers = _NUMBER.findall(text)
    numbers = [n for n in numbers if any(c.isdigit() for c in n)]
    if numbers:
        return _normalise(numbers[-1])
    return _normalise(text)


def _reference(i: int, columns: Mapping[str, Sequence[Any]], answer_column: str) -> str:
    value = columns[answer_column][i] if answer_column in columns else None
    return str(value) if value is not None else str(columns["label_text"][i])


def exact_match(completions: Sequence[str], *, answer_column: str = "answer", **columns: Any) -> list[float]:
    """1.0 where the completion's extracted answer equals the reference's, else 0.0."""
    return [
        float(extract_answer(c) == extract_answer(_reference(i, columns, answer_column)))
        for i, c in enumerate(completions)
    ]


def format_reward(
    completions: Sequence[str], *, pattern: str = DEFAULT_FORMAT_PATTERN, **_: Any
) -> list[float]:
    """1.0 where the whole completion (outer whitespace stripped) matches `pattern` (dot matches newline)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    completions: Sequence[str], *, target: int = 512, completion_tokens: Sequence[int], **_: Any
) -> list[float]:
    """0 up to `target` tokens, then minus the share by which the completion is longer."""
    return [-max(0, n - target) / target for n in completion_tokens]


def _builtin(name: str, options: RewardOptions) -> RewardFn:
    if name == "exact_match":
        return lambda completions, **cols: exact_match(
            completions, answer_column=options.answer_column, **cols
        )
    if name == "format":
        return lambda completions, **cols: format_reward(completions, pattern=options.format_pattern, **cols)
    return lambda completions, **cols: length_penalty(completions, target=options.length_target, **cols)


def load_callable(spec: str) -> RewardFn:
    """`module:function` -> the function; the working directory is importable, as for `python -m`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TunesmithError(
            f"reward_funcs: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor module:function"
        )
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)  # appended, so it never shadows an installed module
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TunesmithError(
            f"reward_funcs: cannot import module {module_name!r} of {spec!r}: {e}. Fix: run from the folder "
            "holding it or add that folder to PYTHONPATH"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TunesmithError(f"reward_funcs: module {module_name!r} has no function {attr!r} ({spec!r})")
    return fn


def build_reward_funcs(
    names: Sequence[str], weights: Sequence[float] = (), options: RewardOptions | None = None
) -> list[RewardFunc]:
    """The configured reward functions with their weights (all 1.0 when no weights are given)."""
    if not names:
        raise TunesmithError(
            f"reward_funcs is empty: name at least one of {', '.join(BUILTINS)} or a module:function"
        )
    if weights and len(weights) != len(names):
        raise TunesmithError(
            f"reward_weights: {len(weights)} weights for {len(names)} reward_funcs; give one per function"
        )
    options = options or RewardOptions()
    funcs = []
    for i, name in enumerate(names):
        fn = _builtin(name, options) if name in BUILTINS else load_callable(name)
        funcs.append(RewardFunc(name, fn, float(weights[i]) if weights else 1.0))
    return funcs


def score(
    funcs: Sequence[RewardFunc], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum per completion, each function's own values) — every value checked to be a finite float."""
    each: dict[str, list[float]] = {}
    for f in funcs:
        values = list(f.fn(list(completions), **columns))
        if len(values) != len(completions):
            raise TunesmithError(
                f"reward function {f.name}: returned {len(values)} values for {len(completions)} completions"
            )
        bad = [v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise TunesmithError(
                f"reward function {f.name}: every value must be a finite float, got {bad[0]!r}"
            )
        each[f.name] = [float(v) for v in values]
    total = [sum(f.weight * each[f.name][i] for f in funcs) for i in range(len(completions))]
    return total, each


__all__ = [
    "BUILTINS",
    "DEFAULT_FORMAT_PATTERN",
    "RewardFunc",
    "RewardOptions",
    "build_reward_funcs",
    "exact_match",
    "extract_answer",
    "format_reward",
    "length_penalty",
    "load_callable",
    "score",
]
