"""ExportReport: what an export wrote and what its checks found (export_dir/export_report.json)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.export.checks import LogitsCheck, ReloadCheck, StopTest
from tunesmith.export.quantize import QuantDrift

REPORT_NAME = "export_report.json"


@dataclass
class ExportReport:
    export_dir: str
    base_model: str
    dtype: str
    device: str
    template: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    quantization_bit: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    stop_tokens: list[str] = field(default_factory=list)
    weight_files: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file this export wrote (removed by a re-export)
    probe_source: str = ""
    logits: LogitsCheck | None = None
    reload: ReloadCheck | None = None
    stop: StopTest | None = None
    quant_drift: QuantDrift | None = None
    notes: list[str] = field(default_factory=list)
    ok: bool = False
    error: str = ""
    seconds: float = 0.0
    hub_model_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.logits is not None:
            d["logits"] |= {"passed": self.logits.passed, "conclusive": self.logits.conclusive}
        if self.reload is not None:
            d["reload"]["passed"] = self.reload.passed
        if self.stop is not None:
            d["stop"]["stop_share"] = self.stop.stop_share
        return d

    def write(self) -> Path:
        """Write export_dir/export_report.json atomically."""
        path = Path(self.export_dir) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def check_lines(self) -> list[str]:
        """One line per check, for the summary and the model card."""
        lines = []
        lg = self.logits
        if lg is not None and not lg.ran:
            lines.append(f"logits vs base + adapter: skipped ({lg.skipped_reason})")
        elif lg is not None:
            lines.append(
                f"logits vs base + adapter: {'PASS' if lg.passed else 'FAIL'}, max |diff| {lg.max_abs_diff:.3g} "
                f"(mean {lg.mean_abs_diff:.3g}) over {lg.positions} positions, tolerance {lg.tolerance:.3g} "
                f"({lg.tolerance_source}); the adapter itself moves logits by up to {lg.adapter_effect:.3g}"
            )
        if self.reload is not None:
            r = self.reload
            lines.append(
                f"reload with plain transformers: {'PASS' if r.passed else 'FAIL'}, max |diff| {r.max_abs_diff:.3g}; "
                f"saved chat template renders {r.template_matches}/{r.template_total} probe prompts as the template"
            )
        if self.quant_drift is not None:
            q = self.quant_drift
            lines.append(
                f"{q.bits}-bit quantization drift vs the 16-bit merge (information): top-1 agreement "
                f"{q.top1_agreement:.1%}, max |diff| {q.max_abs_diff:.3g}"
            )
        if self.stop is not None:
            s = self.stop
            lines.append(
                f"stop test: {s.finish_reasons.count('stop')}/{len(s.finish_reasons)} greedy answers ended with a "
                f"stop token within {s.max_new_tokens} new tokens ({s.stop_share:.0%}; prompts: {s.prompt_source})"
            )
        return lines

    def summary(self) -> str:
        """A few lines for the terminal."""
        head = f"export {'complete' if self.ok else 'FAILED'}: {self.export_dir} ({self.seconds:.1f} s)"
        what = f"  base {self.base_model}, {len(self.adapters)} adapter(s) merged, {self.dtype}"
        if self.quantization_bit:
            what += f", saved {self.quantization_bit}-bit"
        lines = [head, what, *("  " + c for c in self.check_lines()), *("  note: " + n for n in self.notes)]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.hub_model_id:
            lines.append(f"  uploaded to https://huggingface.co/{self.hub_model_id}")
        return "\n".join(lines)
