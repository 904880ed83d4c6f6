"""The prompts the export checks run on: held-out rows of the run's data when readable, else built-in ones.

Order of preference (as ``tunesmith predict`` picks its data): eval_dataset, the val_size split of
dataset, dataset itself (seen in training: said so in the report), then a few general prompts. The data
keys come from the export config, else from the training run's config (run.json in the adapter folder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")

BUILTIN_PROMPTS = (
    "Hello! Who are you?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three fruits.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for staying focused.",
)
# Probes longer than this are cut from the left (the end of a prompt is where the answer starts).
MAX_PROBE_TOKENS = 256


@dataclass(frozen=True)
class Probe:
    messages: list[Message]  # the conversation up to the answer
    ids: list[int]  # rendered with the generation prompt by our template, tokenized once


def builtin_probes(tokenizer: Any, template: Any, n: int) -> list[Probe]:
    """Up to n of BUILTIN_PROMPTS as one-turn conversations (repeated cyclically when n is larger)."""
    texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)]
    return [_probe([{"role": "user", "content": t}], tokenizer, template) for t in texts]


def _probe(messages: list[Message], tokenizer: Any, template: Any) -> Probe:
    text = template.render(messages, add_generation_prompt=True).text
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return Probe(messages, ids[-MAX_PROBE_TOKENS:])


def data_config(cfg: Any, run_manifests: list[dict[str, Any]]) -> Any:
    """cfg, with the data keys of the newest training run when cfg names no dataset."""
    if cfg.data.dataset or cfg.data.eval_dataset or not run_manifests:
        return cfg
    trained = run_manifests[-1].get("config", {})
    keys = ("dataset", "eval_dataset", "dataset_dir", "val_size", "max_samples", "cutoff_len")
    values = {k: trained[k] for k in keys if k in trained}
    for k in ("dataset", "eval_dataset"):
        if k in values:
            values[k] = tuple(values[k])
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **values))


def probes_for(cfg: Any, tokenizer: Any, template: Any, n: int) -> tuple[list[Probe], str]:
    """n probes and where they came from ("eval_dataset ...", "val_size split ...", "dataset ...", "built-in")."""
    d = cfg.data
    if d.dataset or d.eval_dataset:
        from tunesmith.infer.predict import prompt_data

        if d.eval_dataset or not d.val_size:
            # Only n rows are needed; a val_size split must see the rows training saw to hold out the same ones.
            capped = min(d.max_samples or n, n)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, max_samples=capped))
        try:
            data = prompt_data(cfg, tokenizer, template, show_progress=False)
        except TunesmithError as e:  # DataError is one; the checks still run on built-in prompts
            log.warning("export checks: the run's data is not readable here (%s); using built-in prompts", e)
        else:
            take = min(n, len(data.rows))
            probes = [_from_row(data.rows[i], tokenizer, template) for i in range(take)]
            if d.eval_dataset:
                source = f"eval_dataset {', '.join(d.eval_dataset)}"
            elif d.val_size:
                source = f"val_size split of {', '.join(d.dataset)}"
            else:
                source = f"dataset {', '.join(d.dataset)} (training rows, not held out)"
            if take < n:
                probes += builtin_probes(tokenizer, template, n - take)
                source += f" + {n - take} built-in"
            return probes, source
    return builtin_probes(tokenizer, template, n), "built-in prompts"


def _from_row(row: dict[str, Any], tokenizer: Any, template: Any) -> Probe:
    messages = row["prompt_messages"]
    if isinstance(messages, str):
        messages = json.loads(messages)
    return Probe(list(messages), list(row["input_ids"])[-MAX_PROBE_TOKENS:])


def read_run_manifests(folders: list[str]) -> list[dict[str, Any]]:
    """The run.json of each folder that has one (adapters in order, or the model folder)."""
    out = []
    for folder in folders:
        path = Path(folder) / "run.json"
        if path.is_file():
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                log.warning("%s is not valid JSON (%s); the model card leaves its training out", path, e)
    return out
