"""A dataset spec -> canonical rows, under the bad-row policy, with a report of what was dropped and why.

Default policy: skip bad rows, then fail at the end when every row, or more than ``max_share`` of them,
was bad. Strict mode fails on the first bad row. Memory stays bounded: rows are yielded one at a time
and the report keeps only counts and the first few examples per reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunesmith.data.formats import RowError, to_row
from tunesmith.data.readers import iter_records
from tunesmith.data.registry import DatasetSpec, verify_sha1
from tunesmith.data.types import Record, Row
from tunesmith.errors import DataError, Location

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class BadRowPolicy:
    """What to do with invalid rows: skip them (failing when more than max_share are bad) or fail at once."""

    mode: Literal["skip", "fail"] = "skip"
    max_share: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("skip", "fail"):
            raise ValueError(f"BadRowPolicy.mode must be 'skip' or 'fail', got {self.mode!r}")
        if not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"BadRowPolicy.max_share must be in [0, 1], got {self.max_share!r}")


@dataclass
class LoadReport:
    """Counts of rows read / valid / invalid per reason, and the first few bad rows per reason."""

    dataset: str = ""
    rows_read: int = 0
    valid: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    @property
    def invalid_total(self) -> int:
        return sum(self.invalid.values())

    def add_invalid(self, err: RowError) -> None:
        self.invalid[err.reason] = self.invalid.get(err.reason, 0) + 1
        shown = self.examples.setdefault(err.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(err))

    def summary(self) -> str:
        """Human text: totals, then each reason with its count and first examples."""
        head = f"{self.dataset or 'dataset'}: {self.rows_read} rows read, {self.valid} valid"
        if not self.invalid:
            return head
        share = self.invalid_total / max(self.rows_read, 1)
        lines = [f"{head}, {self.invalid_total} invalid ({share:.1%}) skipped"]
        for reason, count in sorted(self.invalid.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {count} row(s), e.g.")
            lines += [f"    {example}" for example in self.examples.get(reason, [])]
        return "\n".join(lines)


def hub_offline(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the Hugging Face hub is switched off (the one place that reads these variables)."""
    env = os.environ if environ is None else environ
    return any(env.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_rows(
    spec: DatasetSpec,
    *,
    dataset_dir: str | Path,
    policy: BadRowPolicy,
    report: LoadReport | None = None,
    show_progress: bool = False,
    require_response: bool = True,
) -> Iterator[Row]:
    """Yield the valid canonical rows of ``spec``, filling ``report`` as it goes; raise per the policy.

    Raises DataError when the dataset is empty, when every row is invalid, or (skip mode) when more than
    ``policy.max_share`` are; RowError on the first bad row in strict (``fail``) mode.
    """
    report = LoadReport() if report is None else report
    report.dataset = report.dataset or spec.name
    for record in iter_spec_records(spec, dataset_dir=dataset_dir, show_progress=show_progress):
        report.rows_read += 1
        try:
            row = to_row(record, spec, require_response=require_response)
        except RowError as err:
            if policy.mode == "fail":
                raise
            report.add_invalid(err)
            continue
        report.valid += 1
        yield row
    _finish(spec, report, policy)


def _finish(spec: DatasetSpec, report: LoadReport, policy: BadRowPolicy) -> None:
    if report.rows_read == 0:
        raise DataError(spec.where, "the dataset has no rows", fix="check the file and its format")
    bad = report.invalid_total
    if bad == 0:
        return
    share = bad / report.rows_read
    if bad == report.rows_read:
        why = "every row is invalid"
    elif share > policy.max_share:
        why = f"{share:.1%} of rows are invalid, more than the allowed {policy.max_share:.0%}"
    else:
        return
    # The fix goes before the multi-line summary so that the message ends with the examples.
    raise DataError(
        spec.where,
        f"{why}; fix those rows (or the dataset's formatting/columns/tags), or raise the allowed "
        f"bad-row share\n{report.summary()}",
    )


def iter_spec_records(
    spec: DatasetSpec, *, dataset_dir: str | Path, show_progress: bool = False
) -> Iterator[Record]:
    """Raw records of a dataset: its local file/folder (SHA-1 checked when given) or the Hugging Face hub."""
    path = spec.local_path(dataset_dir)
    if path is not None:
        if spec.file_sha1:
            verify_sha1(path, spec.file_sha1)
        yield from iter_records(path, show_progress=show_progress)
    elif spec.hf_hub_url is not None:
        yield from _hub_records(spec)
    else:
        raise DataError(spec.where, "no local file or hf_hub_url to load", field="file_name",
                        fix="use hf_hub_url or a local file (file_name)")  # fmt: skip


def _hub_records(spec: DatasetSpec) -> Iterator[Record]:
    try:
        import datasets  # optional: only hub datasets need it
    except ImportError as e:
        raise DataError(spec.where, "loading a dataset from the Hugging Face hub needs the `datasets` package",
                        field="hf_hub_url", fix="pip install 'tunesmith[hub]'") from e  # fmt: skip
    url = spec.hf_hub_url
    try:
        ds = datasets.load_dataset(url, name=spec.subset, data_dir=spec.folder, split=spec.split)
    except Exception as e:  # datasets raises many types here (connection, not found, offline cache miss)
        if hub_offline():
            raise DataError(
                spec.where, f"the Hugging Face hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and "
                f"{url!r} is not in the local datasets cache", field="hf_hub_url",
                fix=f"download the data to a local file and give its path as the dataset (or set file_name "
                f"in {spec.info_file or 'dataset_info.json'}); or unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE",
            ) from e  # fmt: skip
        raise DataError(spec.where, f"could not load {url!r} from the Hugging Face hub: {e}", field="hf_hub_url",
                        fix="check hf_hub_url, subset, folder and split, or use a local file") from e  # fmt: skip
    source = f"hf://datasets/{url}" + (f"/{spec.subset}" if spec.subset else "") + f" [{spec.split}]"
    for i, data in enumerate(ds):
        yield Record(dict(data), Location(source, index=i))
