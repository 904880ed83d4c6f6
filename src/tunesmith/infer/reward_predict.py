"""`tunesmith predict` with `stage: rm`: a reward model scores every chosen/rejected pair.

Writes output_dir/predictions.jsonl as it goes (one line per pair: id, chosen and rejected scores, the
margin, whether chosen wins), resumable like generation predict (same file handling), and a summary
(pair accuracy, mean margin) printed and stored in predictions.meta.json.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from tunesmith.config import Config
from tunesmith.errors import TunesmithError
from tunesmith.infer.predict_io import PredictionFile, read_meta, write_meta

PREDICTIONS = "predictions.jsonl"


@dataclass
class RewardSummary:
    path: Path
    pairs: int
    skipped: int
    accuracy: float
    mean_margin: float
    seconds: float

    def line(self) -> str:
        return (
            f"{self.pairs} pairs scored ({self.skipped} already done) in {self.seconds:.1f} s; "
            f"chosen preferred {100 * self.accuracy:.1f}%, mean margin {self.mean_margin:.4f}"
        )


def reward_model_folder(cfg: Config) -> Path:
    """The folder a stage-rm run wrote: the last adapter's when adapters are given, else the model's."""
    from tunesmith.training.reward import VALUE_HEAD_FILE

    adapters = tuple(cfg.model.adapter_name_or_path)
    folder = Path(adapters[-1] if adapters else cfg.model.model_name_or_path or "")
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(
            f"stage: rm predict needs a reward model, but {folder} has no {VALUE_HEAD_FILE}. Fix: point "
            "model_name_or_path (or adapter_name_or_path, for LoRA) at the output_dir of a stage: rm run"
        )
    return folder


def predict_rewards(cfg: Config, *, fresh: bool = False) -> RewardSummary:
    """Score every pair of the eval data (else the training data) with the configured reward model."""
    import torch

    from tunesmith.data.pipeline import prepare
    from tunesmith.model.loader import load_tokenizer
    from tunesmith.training.reward import load_reward_model
    from tunesmith.training.setup import data_options, template_for

    if not cfg.training.output_dir:
        raise TunesmithError("output_dir is not set: where should predictions.jsonl go?")
    out = Path(cfg.training.output_dir)
    folder = reward_model_folder(cfg)
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    opts = data_options(cfg, "rm")
    if cfg.data.eval_dataset:  # score the eval data when there is some, as generation predict does
        from dataclasses import replace

        opts = replace(opts, dataset=tuple(cfg.data.eval_dataset), eval_dataset=(), val_size=0.0)
    rows = prepare(opts, tokenizer, template_for(cfg, tokenizer)).train
    names = "+".join(opts.dataset)
    ids = [f"{names}#{i}" for i in range(len(rows))]  # the data plan is seeded: stable across reruns

    file = PredictionFile.open(out / PREDICTIONS, fresh=fresh)
    todo = [i for i in range(len(rows)) if ids[i] not in file.done]
    cuda = torch.cuda.is_available()
    scorer = load_reward_model(folder, dtype=cfg.infer.infer_dtype, device="cuda" if cuda else "cpu")
    size = cfg.training.hf.get("per_device_eval_batch_size") or (64 if cuda else 8)
    write_meta(out, {**(read_meta(out) or {}), "reward_model": str(folder), "data": list(opts.dataset)})
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="score pairs", unit="pairs", file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(todo), size):
        batch = [rows[i] for i in todo[start : start + size]]
        chosen = _scores(scorer, [r["chosen_input_ids"] for r in batch], tokenizer.pad_token_id)
        rejected = _scores(scorer, [r["rejected_input_ids"] for r in batch], tokenizer.pad_token_id)
        lines = b"".join(
            orjson.dumps(
                {
                    "id": ids[i],
                    "chosen_score": c,
                    "rejected_score": r,
                    "margin": c - r,
                    "chosen_preferred": c > r,
                }
            )
            + b"\n"
            for i, c, r in zip(todo[start : start + size], chosen, rejected)
        )
        file.append(lines)
        bar.update(len(batch))
    bar.close()
    file.reorder(ids)
    records = [orjson.loads(line) for line in file.path.read_bytes().splitlines() if line.strip()]
    n = max(len(records), 1)
    summary = RewardSummary(
        file.path,
        len(todo),
        len(rows) - len(todo),
        sum(r["chosen_preferred"] for r in records) / n,
        sum(r["margin"] for r in records) / n,
        time.perf_counter() - t0,
    )
    print(f"tunesmith predict: {summary.line()}", file=sys.stderr)
    write_meta(
        out,
        {
            **(read_meta(out) or {}),
            "summary": {
                "pairs": len(records),
                "accuracy": summary.accuracy,
                "mean_margin": summary.mean_margin,
            },
        },
    )
    return summary


def _scores(scorer: Any, seqs: list[list[int]], pad_id: int | None) -> list[float]:
    """Scores of right-padded sequences (the value head reads each one's last real token)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[k, : len(s)] = 1
    return [float(x) for x in scorer(ids, mask).tolist()]


__all__ = ["RewardSummary", "predict_rewards", "reward_model_folder"]
