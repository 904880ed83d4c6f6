"""`tunesmith eval`: a multiple-choice benchmark (task BENCHMARK_SPLIT) or perplexity (task perplexity).

The model loads as every inference command loads it (``HFEngine.from_config``: base + adapters merged,
``infer_dtype``, ``template`` incl. auto), in eval mode; nothing is sampled, so a run is deterministic.
Results go to ``save_dir`` when it is set (see ``report.save_report``); without it they are only
returned (the CLI prints ``report.summary()``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.benchmark import CHOICES, Benchmark, load_benchmark
from tunesmith.evaluation.choice import choice_probs, choice_tokens
from tunesmith.evaluation.perplexity import sequence_nll
from tunesmith.evaluation.prompts import build_prompts
from tunesmith.evaluation.report import (
    ChoiceReport,
    EvalReport,
    PerplexityReport,
    Prediction,
    SubjectInfo,
    save_report,
)

log = logging.getLogger("tunesmith")
PERPLEXITY = "perplexity"
PERPLEXITY_STAGES = ("pt", "sft")


def run(cfg: Config, *, show_progress: bool = True) -> EvalReport:
    """Evaluate the configured model on ``cfg.evaluation.task``; save to save_dir when set."""
    from tunesmith.infer.hf_engine import HFEngine

    ev = cfg.evaluation
    if not ev.task:
        raise TunesmithError(
            "task is not set. Fix: task: mmlu_test (a benchmark under task_dir, as BENCHMARK_SPLIT), "
            "sample_test (the bundled sample benchmark) or perplexity (on dataset / eval_dataset)"
        )
    # Check the benchmark or data settings before loading the model: a wrong path fails at once.
    if ev.task == PERPLEXITY:
        _perplexity_data(cfg)
        bench = None
    else:
        bench = load_benchmark(ev.task_dir, ev.task, n_shot=ev.n_shot)
    engine = HFEngine.from_config(cfg)
    report: EvalReport
    if bench is not None:
        report = evaluate_benchmark(
            cfg, bench, engine.model, engine.tokenizer, engine.template, show_progress=show_progress
        )
    else:
        report = evaluate_perplexity(
            cfg, engine.model, engine.tokenizer, engine.template, show_progress=show_progress
        )
    if ev.save_dir:
        report = replace(report, save_dir=save_report(report, ev.save_dir))
        log.info("evaluation results saved to %s", report.save_dir)
    return report


def _setup(cfg: Config) -> dict[str, Any]:
    """What was evaluated, recorded in results.json (so results of another model are never mixed up)."""
    return {
        "model": cfg.model.model_name_or_path,
        "adapters": list(cfg.model.adapter_name_or_path),
        "template": cfg.model.template or "auto",
        "cutoff_len": cfg.data.cutoff_len,
    }


def evaluate_benchmark(
    cfg: Config, bench: Benchmark, model: Any, tokenizer: Any, template: Any, *, show_progress: bool = True
) -> ChoiceReport:
    """Score every question of a loaded benchmark with an already loaded model."""
    ev = cfg.evaluation
    thinking = cfg.data.enable_thinking
    choice = choice_tokens(tokenizer, template, ev.lang, thinking)
    prompts = build_prompts(
        [(s.name, s.shots, q) for s in bench.subjects for q in s.questions],
        template=template,
        tokenizer=tokenizer,
        n_shot=ev.n_shot,
        lang=ev.lang,
        cutoff_len=cfg.data.cutoff_len,
        enable_thinking=thinking,
        answer_prefix=choice.prefix,
    )
    model.eval()
    probs = choice_probs(
        model,
        [p.input_ids for p in prompts],
        choice.ids,
        batch_size=ev.batch_size,
        pad_id=tokenizer.pad_token_id,
        show_progress=show_progress,
    )
    predictions = []
    for p, pr in zip(prompts, probs):
        best = CHOICES[max(range(len(CHOICES)), key=pr.__getitem__)]  # the first of equal maxima
        predictions.append(
            Prediction(p.question.subject, p.question.index, best, p.question.answer, tuple(pr), p.shots)
        )
    setup = {
        **_setup(cfg),
        "benchmark": str(bench.folder),
        "split": bench.split,
        "n_shot": ev.n_shot,
        "lang": ev.lang,
        "choice_token_ids": list(choice.ids),
        "answer_prefix_ids": list(choice.prefix),
    }
    return ChoiceReport(
        task=ev.task or "",
        setup=setup,
        subjects=tuple(SubjectInfo(s.key, s.name, s.category) for s in bench.subjects),
        predictions=tuple(predictions),
        shots_dropped=sum(p.shots < p.pool for p in prompts),
        tokens_cut=sum(p.cut > 0 for p in prompts),
    )


def _perplexity_data(cfg: Config) -> tuple[tuple[str, ...], str]:
    """(dataset names, which part is scored) of a perplexity run; errors name the key to set."""
    d, stage = cfg.data, cfg.finetuning.stage
    if stage not in PERPLEXITY_STAGES:
        raise TunesmithError(
            f"task: perplexity scores stage pt (plain text, every token) or sft (the responses); got stage: "
            f"{stage}. Fix: set stage: pt or stage: sft"
        )
    if d.eval_dataset:
        return d.eval_dataset, "eval_dataset"
    if d.dataset:
        return d.dataset, "val_size held-out part" if d.val_size else "dataset"
    raise TunesmithError(
        "task: perplexity needs data. Fix: set eval_dataset (or dataset) to dataset names or files"
    )


def evaluate_perplexity(
    cfg: Config, model: Any, tokenizer: Any, template: Any, *, show_progress: bool = True
) -> PerplexityReport:
    """Perplexity of eval_dataset, else of the val_size held-out part of dataset, else of all of dataset."""
    from tunesmith.data.pipeline import prepare
    from tunesmith.training.setup import data_options

    names, part = _perplexity_data(cfg)
    stage = cfg.finetuning.stage
    # pt: documents stay whole (packing's preprocessing; no bins are packed), not cut from one stream.
    opts = replace(data_options(cfg, stage, show_progress=show_progress), packing=stage == "pt")
    if part == "eval_dataset":  # scored as the "train" split: the training data is not tokenized at all
        opts = replace(opts, dataset=names, eval_dataset=(), val_size=0.0)
    prepared = prepare(opts, tokenizer, template)
    data = prepared.eval if part == "val_size held-out part" else prepared.train
    if data is None or len(data) == 0:
        raise TunesmithError(f"task: perplexity: no samples left in {', '.join(names)} after preprocessing")
    model.eval()
    nll = sequence_nll(
        model,
        data,
        data.lengths().tolist(),
        batch_size=cfg.evaluation.batch_size,
        pad_id=tokenizer.pad_token_id,
        show_progress=show_progress,
    )
    setup = {**_setup(cfg), "datasets": list(names), "scored": part, "stage": stage}
    return PerplexityReport(task=PERPLEXITY, setup=setup, nll=nll)
