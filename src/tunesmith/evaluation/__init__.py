"""`tunesmith eval`: multiple-choice benchmarks (MMLU / CMMLU / C-Eval layouts) and perplexity."""

from tunesmith.evaluation.report import ChoiceReport, EvalReport, PerplexityReport
from tunesmith.evaluation.run import evaluate_benchmark, evaluate_perplexity, run

__all__ = [
    "ChoiceReport",
    "EvalReport",
    "PerplexityReport",
    "evaluate_benchmark",
    "evaluate_perplexity",
    "run",
]
