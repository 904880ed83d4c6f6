"""`tunesmith check`: a preflight that loads no model weights.

It validates the config, reads every dataset (rows, invalid rows with reasons), prints two samples
exactly as the model will see them with the supervised tokens highlighted, token-length percentiles,
what `cutoff_len` does to the data, and warnings (targets without EOS, a named template that disagrees
with the tokenizer's own). Exit code 0 when the data is usable, 1 otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from tunesmith.config import Config
from tunesmith.data.pipeline import STAGE_KIND, Prepared, SplitStats, prepare
from tunesmith.data.stops import stop_token_ids
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100
_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
_OPEN, _CLOSE = "⟦", "⟧"  # supervised text markers when there is no colour
_EOS_SCAN_ROWS = 200_000


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def highlight(tokenizer: Any, input_ids: list[int], labels: list[int] | None, colour: bool) -> str:
    """Decode a row, marking the tokens that carry a loss term (coloured, or between ⟦ and ⟧)."""
    if labels is None:
        return tokenizer.decode(input_ids, skip_special_tokens=False)
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            sup = labels[start] != IGNORE_INDEX
            if colour:
                out.append(f"{_GREEN if sup else _DIM}{text}{_RESET}")
            else:
                out.append(f"{_OPEN}{text}{_CLOSE}" if sup else text)
            start = i
    return "".join(out)


def _sample_columns(columns: list[str]) -> list[tuple[str, str, str | None]]:
    """(title, ids column, labels column) pairs to show for a row of this kind."""
    if "chosen_input_ids" in columns:
        return [
            ("chosen", "chosen_input_ids", "chosen_labels"),
            ("rejected", "rejected_input_ids", "rejected_labels"),
        ]
    return [("", "input_ids", "labels" if "labels" in columns else None)]


def _lengths_table(stats: SplitStats) -> list[str]:
    lines = [f"  {'':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    for name, col in (
        ("prompt", "prompt_tokens"),
        ("response", "response_tokens"),
        ("total", "total_tokens"),
    ):
        p = stats.percentiles(col)
        if p:
            lines.append(f"  {name:<10}" + "".join(f"{p[k]:>8}" for k in ("p50", "p90", "p99", "max")))
    return lines


def _eos_missing(prepared: Prepared, stops: list[int]) -> tuple[int, int]:
    """Rows whose last supervised label (the last token learned) is not a stop token, of the rows scanned.

    ``stops`` holds a template's train_eos too, which ends every training sample of the GLM family.
    """
    table = prepared.train.table
    pairwise = "chosen_labels" in table.column_names  # rm/dpo: check the chosen responses
    lab_col = "chosen_labels" if pairwise else "labels"
    if lab_col not in table.column_names:
        return 0, 0
    n = min(len(prepared.train), _EOS_SCAN_ROWS)
    labels = table.column(lab_col).slice(0, n).to_pylist()
    missing = 0
    for row_labels in labels:
        last = next((lab for lab in reversed(row_labels) if lab != IGNORE_INDEX), None)
        if last is not None and last not in stops:
            missing += 1
    return missing, n


def run_check(cfg: Config, out: TextIO | None = None, colour: bool | None = None) -> int:
    """Run the preflight and print the report; returns the process exit code."""
    from tunesmith.data.templates import AutoTemplate, compare_with_tokenizer
    from tunesmith.model.loader import load_tokenizer
    from tunesmith.training.setup import data_options, require_model, template_for

    out = out or sys.stdout
    colour = out.isatty() if colour is None else colour
    report = CheckReport(warnings=list(cfg.warnings))
    say = lambda *lines: print(*lines, sep="\n", file=out)  # noqa: E731

    stage = cfg.finetuning.stage
    kind = STAGE_KIND[stage]
    say(f"tunesmith check: config {cfg.source or '(overrides)'} is valid; stage {stage} ({kind} data)")
    tokenizer = load_tokenizer(
        require_model(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        new_special_tokens=cfg.model.new_special_tokens,
    )
    template = template_for(cfg, tokenizer)
    say(f"tokenizer: {require_model(cfg)} ({len(tokenizer)} tokens); template: {template.name}")
    if not cfg.data.dataset:
        raise TunesmithError(
            "no dataset configured: set dataset (a name from dataset_info.json or a file path)"
        )
    prepared = prepare(data_options(cfg, stage), tokenizer, template)

    say("", "== datasets ==")
    for conv in prepared.converted:
        say(conv.report)
    say("", "== samples (as the model sees them) ==")
    say(f"supervised tokens are {'green' if colour else f'between {_OPEN} and {_CLOSE}'}")
    for i in range(min(2, len(prepared.train))):
        row = prepared.train[i]
        for title, ids_col, lab_col in _sample_columns(prepared.train.column_names):
            head = f"-- sample {i}{' ' + title if title else ''}: {len(row[ids_col])} tokens"
            if lab_col:
                head += f", {sum(1 for x in row[lab_col][1:] if x != IGNORE_INDEX)} supervised"
            say(head, highlight(tokenizer, row[ids_col], row[lab_col] if lab_col else None, colour))

    st = prepared.train_stats
    say("", f"== token lengths (before truncation; cutoff_len {cfg.data.cutoff_len}) ==", *_lengths_table(st))
    truncated = (
        int(st.columns["truncated"].sum())
        if "truncated" in st.columns and len(st.columns["truncated"])
        else 0
    )
    unit = "documents in" if kind == "pt" else "rows in"
    out_unit = f"sequences of up to {cfg.data.cutoff_len} tokens" if kind == "pt" else "kept"
    say(
        f"  {unit}: {st.rows_in}, {out_unit}: {st.rows_out}, truncated: {truncated}, dropped: {sum(st.dropped.values())}"
        + "".join(f"\n    dropped ({reason}): {n}" for reason, n in st.dropped.items())
    )
    if prepared.eval_stats is not None:
        say(f"  eval rows: {prepared.eval_stats.rows_out}")

    if kind in ("sft", "kto", "pairwise"):
        stops = stop_token_ids(tokenizer, template)
        missing, scanned = _eos_missing(prepared, stops)
        if missing:
            report.warnings.append(
                f"{missing} of {scanned} training targets do not end with a stop token "
                f"({[tokenizer.decode([t]) for t in stops]}): the model will not "
                f"learn to stop on them (truncated responses? raise cutoff_len or use truncation: drop)"
            )
    if kind != "pt" and not isinstance(template, AutoTemplate) and tokenizer.chat_template:
        diffs = compare_with_tokenizer(template, tokenizer)
        if diffs:
            report.warnings.append(
                f"template {template.name!r} renders differently from the tokenizer's own chat "
                f"template (use template: auto to train with the tokenizer's):\n    "
                + "\n    ".join(diffs[:5])
            )
    if st.rows_out == 0:
        report.errors.append("no usable training rows: every row was dropped (see the reasons above)")

    say("", "== verdict ==")
    say(*(f"warning: {w}" for w in report.warnings))
    say(*(f"error: {e}" for e in report.errors))
    say(
        "usable: yes" if not report.errors else "usable: no",
        f"(data cache: {'reused' if prepared.reused else 'built'}, {prepared.seconds:.1f} s)",
    )
    return 0 if not report.errors else 1
