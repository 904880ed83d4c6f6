"""The export proves itself: merged logits vs base + adapter, a plain-transformers reload, a stop test.

Default logits tolerance: a share of the largest reference logit, by dtype (REL_TOLERANCE). A correct merge
differs from the unmerged adapter only by rounding (merged W + s*B@A is rounded once, the unmerged path
rounds x@W and s*(x@A)@B separately); rounding error grows with the logit scale, so the bound does too.
A wrong merge (scaling, target modules, base) moves logits by about the adapter's own effect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.export.probes import Probe

log = logging.getLogger("tunesmith")

# Measured on the tiny Qwen2 with a trained LoRA (tests/export): a correct merge differs by 1e-6 of the
# logit scale in fp32 and 1.7e-2 in bf16; a 2x scaling error by ~1.1x the scale in both. fp16 has 8x
# bf16's mantissa precision. The margins leave room for deeper models' accumulated rounding.
REL_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STOP_SHARE_WARN = 0.5  # below this share of answers ending with a stop token the log warns loudly


@dataclass
class LogitsCheck:
    """Merged model vs base + unmerged adapter(s) on the probe prompts."""

    ran: bool
    skipped_reason: str = ""
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    tolerance: float = 0.0
    tolerance_source: str = ""
    adapter_effect: float = 0.0  # max |base + adapter - base|: what a wrong merge would move
    logit_scale: float = 0.0
    positions: int = 0

    @property
    def passed(self) -> bool:
        return not self.ran or self.max_abs_diff <= self.tolerance

    @property
    def conclusive(self) -> bool:
        """Whether the adapter moves logits more than the tolerance (else no merge would pass too)."""
        return self.adapter_effect > self.tolerance


@dataclass
class ReloadCheck:
    """The written folder loaded with plain transformers: same logits, same prompt rendering."""

    folder: str
    max_abs_diff: float
    tolerance: float
    template_matches: int
    template_total: int
    template_mismatch_example: str = ""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.template_matches == self.template_total


@dataclass
class StopTest:
    """Greedy answers to held-out prompts: how many ended with a stop token within max_new_tokens."""

    max_new_tokens: int
    prompt_source: str
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # the first answers, for the report

    @property
    def stop_share(self) -> float:
        return self.finish_reasons.count("stop") / max(len(self.finish_reasons), 1)


def default_tolerance(dtype: torch.dtype, logit_scale: float) -> float:
    """REL_TOLERANCE[dtype] x the largest |logit| (at least 1, so near-zero logits keep a usable bound)."""
    return REL_TOLERANCE.get(dtype, REL_TOLERANCE[torch.bfloat16]) * max(logit_scale, 1.0)


@torch.inference_mode()
def probe_logits(model: Any, probes: Sequence[Probe]) -> list[torch.Tensor]:
    """Logits [positions, vocab] of each probe (one at a time: no padding to differ), as fp32 on the CPU."""
    device = model.get_input_embeddings().weight.device
    out = []
    for p in probes:
        ids = torch.tensor([p.ids], dtype=torch.long, device=device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def diff_stats(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max, mean) absolute difference over every position and vocabulary entry."""
    maxes = [(x - y).abs().max().item() for x, y in zip(a, b)]
    total = sum((x - y).abs().sum().item() for x, y in zip(a, b))
    count = sum(x.numel() for x in a)
    return max(maxes, default=0.0), total / max(count, 1)


def logits_check(
    reference: Sequence[torch.Tensor],
    merged: Sequence[torch.Tensor],
    base: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype,
    tolerance: float | None,
) -> LogitsCheck:
    """Compare merged to reference logits; tolerance None -> default_tolerance(dtype, logit scale)."""
    scale = max((r.abs().max().item() for r in reference), default=0.0)
    if tolerance is None:
        tol, source = default_tolerance(dtype, scale), f"default for {str(dtype).removeprefix('torch.')}"
    else:
        tol, source = tolerance, "export_check_tolerance"
    max_diff, mean_diff = diff_stats(reference, merged)
    return LogitsCheck(
        ran=True,
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        tolerance=tol,
        tolerance_source=source,
        adapter_effect=diff_stats(reference, base)[0],
        logit_scale=scale,
        positions=sum(r.shape[0] for r in reference),
    )


def template_check(tokenizer: Any, template: Any, probes: Sequence[Probe]) -> tuple[int, str]:
    """How many probes the saved tokenizer's chat template renders to our template's ids; one mismatch."""
    matches, example = 0, ""
    for p in probes:
        ours = template.render(p.messages, add_generation_prompt=True).text
        theirs = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        ours_ids = tokenizer.backend_tokenizer.encode(ours, add_special_tokens=False).ids
        theirs_ids = tokenizer.backend_tokenizer.encode(theirs, add_special_tokens=False).ids
        if ours_ids == theirs_ids:
            matches += 1
        elif not example:
            example = f"ours {ours!r} vs saved chat template {theirs!r}"
    return matches, example


def stop_test(
    model: Any, tokenizer: Any, template: Any, probes: Sequence[Probe], *, max_new_tokens: int, source: str
) -> StopTest:
    """Greedy generation through the inference engine; the share of answers a stop token ended."""
    from tunesmith.infer.hf_engine import HFEngine
    from tunesmith.infer.settings import SamplingSettings

    engine = HFEngine.build(model, tokenizer, template, name="export-check")
    settings = SamplingSettings(do_sample=False, max_new_tokens=max_new_tokens)
    result = StopTest(max_new_tokens, source)
    for p in probes:  # one at a time: batching would change nothing but the padding
        c = engine.generate([p.ids], settings)[0][0]
        result.finish_reasons.append(c.finish_reason)
        result.completion_tokens.append(c.completion_tokens)
        if len(result.examples) < 3:
            result.examples.append(c.text)
    if result.stop_share < STOP_SHARE_WARN:
        log.warning(
            "STOP TEST: only %d of %d greedy answers ended with a stop token within %d new tokens. The "
            "exported model may run on until the token limit in every tool. Likely causes: too few training "
            "steps; the answers' end-of-turn token masked out of the loss; a template other than the one it "
            "was trained with (template: %s); or answers in the data longer than export_check_max_new_tokens.",
            result.finish_reasons.count("stop"), len(result.finish_reasons), max_new_tokens, template.name,
        )  # fmt: skip
    return result


def reload_check(
    folder: str, expected: Sequence[torch.Tensor], probes: Sequence[Probe], template: Any, *,
    tolerance: float, device_map: Any = None,
) -> tuple[ReloadCheck, Any, Any]:  # fmt: skip
    """Load ``folder`` with plain transformers (defaults only) and compare; returns the check, model, tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_diff, _ = diff_stats(expected, probe_logits(model, probes))
    matches, example = template_check(tokenizer, template, probes)
    check = ReloadCheck(folder, max_diff, tolerance, matches, len(probes), example)
    return check, model, tokenizer
