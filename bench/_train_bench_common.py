"""The pure parts of bench/train_throughput.py: shapes, data, side configs, FLOPs/MFU, goals, the LF child.

Importing this module needs only the standard library: it is also the LLaMA-Factory child's entry point
(`python bench/_train_bench_common.py lf-run ARGS.json LOG.jsonl`), run with LLaMA-Factory's interpreter
and PYTHONPATH, where tunesmith is not importable.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import _version, cli_value, steady_rate  # noqa: E402
from train_gpu_smoke import QWEN25_05B  # noqa: E402

# Llama-3.2-1B(-Instruct) config.json as published (architecture only; weights are random here).
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
}  # fmt: skip
ARCHS = {"qwen": QWEN25_05B, "llama": LLAMA32_1B}
TEMPLATES = {"qwen": "qwen", "llama": "llama3"}
SIDES = ("ts-default", "ts-best", "lf-default", "lf-best")
METHODS = {
    "lora": {"finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "learning_rate": 1e-4},
    "full": {"finetuning_type": "full", "learning_rate": 1e-5},
}
DATASET = "bench_mix"
# Goals of issue #8 (the summary reports pass/fail against them).
GOAL_DEFAULT_LORA_SPEEDUP = 50.0
GOAL_BEST_SPEEDUP = 2.0
GOAL_FULL_1B_MFU = 0.45
GOAL_MEMORY_RATIO = 0.7
# Step-1 loss of the default pair (same 8 documents, same initial weights): bf16 noise plus LLaMA-Factory's
# one extra trained token per row (qwen: the "\n" after <|im_end|>) stay far below 1%.
STEP1_LOSS_REL_TOL = 0.01
# Mean loss over the run of the best pair (different packing, so different batches): an effectiveness check.
MEAN_LOSS_REL_TOL = 0.03
DEFINITIONS = {
    "trained_tokens": "labels != -100 after the causal shift (no padding, no prompt), counted per "
    "micro-batch from the batches each side trained on: tunesmith's trainer_log.jsonl; LLaMA-Factory: a "
    "forward pre-hook applying the same rule (its own log has whole-second times and no trained-token count)",
    "tokens_per_s": "steady: trained tokens between the first logged step >= warm and the last, over "
    "the time between those log events",
    "peak_mem_gib": "torch.cuda.max_memory_allocated of the training process (CPU: peak RSS)",
    "mfu": "trained tokens/s x model FLOPs per trained token / dense bf16 peak; FLOPs per trained token from "
    "the tokenized data set: full 6N (N = non-embedding matmul weights) per input token + 6 x vocab x hidden "
    "per trained token; lora 4N + 6 x LoRA params per input token + 4 x vocab x hidden per trained token; "
    "attention 12 x layers x heads x head_dim per causal query-key pair within a document; checkpointing "
    "recomputation not counted",
    "loss_guard": "default pair: step-1 loss (same documents in file order, same initial weights) within 1%; "
    "best pair: mean loss over the common steps within 3% (different packing: not the same tokens)",
}
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12}  # dense, no sparsity


# ---- model shape, FLOPs, MFU --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> Shape:
        heads = cfg["num_attention_heads"]
        return cls(
            cfg["num_hidden_layers"],
            cfg["hidden_size"],
            heads,
            cfg["num_key_value_heads"],
            cfg.get("head_dim") or cfg["hidden_size"] // heads,
            cfg["intermediate_size"],
            cfg["vocab_size"],
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn
        return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]

    def params(self, lora_rank: int) -> dict[str, int]:
        """Matmul weights: body (decoder layers), head (vocab x hidden), LoRA on all linears."""
        lin = self.linears()
        return {
            "body": self.layers * sum(i * o for i, o in lin),
            "head": self.vocab * self.hidden,
            "lora": self.layers * lora_rank * sum(i + o for i, o in lin),
        }


@dataclass(frozen=True)
class DataStats:
    """Token totals of the tokenized training rows (after truncation): inputs, trained, causal pairs."""

    rows: int
    input_tokens: int
    trained_tokens: int
    attn_pairs: int  # sum over documents of L(L+1)/2: query-key pairs of causal attention within a document

    @classmethod
    def of(cls, lengths: list[int], trained_tokens: int) -> DataStats:
        return cls(len(lengths), sum(lengths), trained_tokens, sum(n * (n + 1) // 2 for n in lengths))


def flops_per_trained_token(shape: Shape, method: str, stats: DataStats, lora_rank: int = 8) -> dict:
    """Model FLOPs per trained token, from dataset averages (recomputation by checkpointing not counted).

    full: 6 x body params per input token (forward 2, backward 4: input and weight gradients) + 6 x head
    params per trained token. lora: the frozen base needs forward + input-gradient backward, 4 x params
    (body per input token, head per trained token), plus 6 x LoRA params per input token. The head is counted
    only where a loss is computed (trained tokens): logits of other positions are not needed. Attention:
    12 x layers x heads x head_dim per causal query-key pair within a document (QK^T and AV, forward 2 FLOPs
    each per dim, backward twice that), the same for both methods.
    """
    p = shape.params(lora_rank)
    k = 6 if method == "full" else 4
    per_input = k * p["body"] + (6 * p["lora"] if method == "lora" else 0)
    ratio = stats.input_tokens / stats.trained_tokens
    attn = 12 * shape.layers * shape.heads * shape.head_dim * stats.attn_pairs / stats.trained_tokens
    terms = {"dense": per_input * ratio, "head": k * p["head"], "attention": attn}
    return terms | {"total": sum(terms.values()), "input_per_trained_token": round(ratio, 4)}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (None: unknown, pass --peak-tflops)."""
    for key, value in PEAK_BF16_FLOPS.items():  # "H100 PCIe" is checked before "H100"
        if all(word in device_name for word in key.split()):
            return value
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s * flops_per_token / peak


# ---- data ------------------------------------------------------------------------------------------------


def long_rows(
    alpaca: list[dict], n: int, seed: int = 0, chars: tuple[int, int] = (6000, 24000)
) -> list[dict]:
    """n alpaca rows whose answers join consecutive alpaca outputs to 6-24k characters (~1.5-6k tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target, j = rng.randint(*chars), rng.randrange(len(alpaca))
        answers: list[str] = []
        questions: list[str] = []
        while sum(len(a) + 2 for a in answers) < target:
            answers.append(alpaca[j % len(alpaca)]["output"])
            questions.append(alpaca[j % len(alpaca)]["instruction"])
            j += 1
        rows.append(
            {
                "instruction": "Answer these questions in order, in one long text.",
                "input": "\n".join(questions[:8]),
                "output": "\n\n".join(answers),
            }
        )
    return rows


def prompt_heavy(row: dict) -> dict:
    """The row as a long prompt with a one-word answer: its answer text moves into the input, and the answer
    becomes that text's first word (data of the extraction or classification kind, whose trained tokens are a
    small share of each row)."""
    text = (row["input"] + "\n\n" if row.get("input") else "") + row["output"]
    return {"instruction": row["instruction"], "input": text, "output": (row["output"].split() or ["-"])[0]}


def write_bench_data(
    alpaca_file: Path, folder: Path, n_long: int, n_alpaca: int | None = None, long_prompts: bool = False
) -> dict:
    """alpaca rows + long rows, shuffled once (seed 0), as folder/bench_mix.json with a dataset_info.json;
    with ``long_prompts`` every row `prompt_heavy` (the same texts, nearly all of them prompt)."""
    alpaca = json.loads(alpaca_file.read_text(encoding="utf-8"))[:n_alpaca]
    long = long_rows(alpaca, n_long)
    rows = alpaca + long
    random.Random(0).shuffle(rows)  # sequential reading of this file is one fixed random order
    if long_prompts:
        rows = [prompt_heavy(r) for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DATASET}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({DATASET: {"file_name": f"{DATASET}.json"}}))
    return {
        "dataset": DATASET,
        "dataset_dir": str(folder),
        "alpaca_rows": len(alpaca),
        "long_rows": n_long,
        "long_answer_chars": [min(len(r["output"]) for r in long), max(len(r["output"]) for r in long)]
        if long
        else None,
        "source": alpaca_file.name,
        "order": "alpaca + long rows, shuffled with seed 0",
        "long_prompts": long_prompts,
    }


# ---- the four sides -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Experiment-wide settings: the same for every side."""

    cutoff_len: int = 2048
    default_rows: int = 8  # rows per optimizer step of the default pair (LLaMA-Factory: 1 x 8 accumulation)
    best_batch: int = 8  # packed rows per micro-batch of the best pair (accumulation 1)
    bf16: bool = True
    gpu: bool = True


def common_keys(model: Path, arch: str, method: str, data_dir: str, steps: int, plan: Plan) -> dict:
    """Keys both tools get with the same value: model, data, method, optimizer schedule, logging."""
    keys = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": str(model),
        "dataset": DATASET,
        "dataset_dir": data_dir,
        "template": TEMPLATES[arch],
        "cutoff_len": plan.cutoff_len,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 10),
        "overwrite_output_dir": True,
        "plot_loss": False,
        **METHODS[method],
    }
    return keys | ({"bf16": True} if plan.bf16 else {})


def side_keys(side: str, plan: Plan) -> dict:
    """What differs per side (speed flags, batch shape); the default pair reads the data in file order."""
    # the example yaml's workers; the CPU smoke (2 cores) keeps one process
    workers = {"preprocessing_num_workers": 16, "dataloader_num_workers": 4} if plan.gpu else {}
    lf_example = workers | {"overwrite_cache": True}
    if side == "lf-default":  # LLaMA-Factory's examples/train_lora yaml
        return lf_example | {
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": plan.default_rows,
            "disable_shuffling": True,
        }
    if side == "lf-best":
        best = {"packing": True, "neat_packing": True, "flash_attn": "best"}
        if plan.gpu:  # Liger's Triton kernels need a CUDA GPU
            best["enable_liger_kernel"] = True
        return (
            lf_example
            | best
            | {"per_device_train_batch_size": plan.best_batch, "gradient_accumulation_steps": 1}
        )
    if side == "ts-default":
        return {
            "per_device_train_batch_size": plan.default_rows,
            "gradient_accumulation_steps": 1,
            "train_sampling_strategy": "sequential",
        }
    if side == "ts-best":
        return {
            "packing": True,
            "neat_packing": True,
            "per_device_train_batch_size": plan.best_batch,
            "gradient_accumulation_steps": 1,
        }
    raise ValueError(f"unknown side {side!r}; allowed: {', '.join(SIDES)}")


def parse_extra_sides(items: list[str]) -> dict[str, str]:
    """--extra-side NAME=BASE -> {NAME: BASE}: one more run per arch and method, configured as BASE plus its
    own --set NAME:key=value flags (e.g. an A/B of one flag in the same run). Shown, never in the goals."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, base = item.partition("=")
        if not eq or base not in SIDES or name in SIDES or name[:3] != base[:3] or "/" in name:
            raise ValueError(
                f"--extra-side {item!r}: expected NAME=BASE with BASE one of {', '.join(SIDES)} and a new "
                "NAME of the same tool (ts-... or lf-...)"
            )
        out[name] = base
    return out


def parse_side_src(items: list[str], extra: dict[str, str]) -> dict[str, str]:
    """--side-src NAME=DIR: the tunesmith side NAME (an --extra-side) runs the package under DIR, another
    source tree (a checkout of another commit), so code changes without a config key are A/B'd in one run."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, folder = item.partition("=")
        if not eq or name not in extra or not name.startswith("ts-"):
            raise ValueError(f"--side-src {item!r}: expected NAME=DIR with NAME a tunesmith --extra-side")
        if not (Path(folder) / "tunesmith" / "__init__.py").is_file():
            raise ValueError(
                f"--side-src {item!r}: {folder} has no tunesmith/__init__.py (give a src folder)"
            )
        out[name] = str(Path(folder).resolve())
    return out


def src_digest(folder: Path) -> str:
    """12 hex digits identifying the tunesmith source under ``folder`` (its .py and data files)."""
    h = hashlib.sha256()
    root = folder / "tunesmith"
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def base_side(side: str, extra: dict[str, str]) -> str:
    """The named side an extra side is configured from (a named side is its own base)."""
    return extra.get(side, side)


def parse_sets(items: list[str], extra: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """--set SIDE:key=value (value read as JSON when it parses, else a string) -> {side: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    allowed = [*SIDES, *(extra or {})]
    for item in items:
        side, sep, kv = item.partition(":")
        key, eq, raw = kv.partition("=")
        if not sep or not eq or side not in allowed or not key:
            raise ValueError(f"--set {item!r}: expected SIDE:key=value with SIDE one of {', '.join(allowed)}")
        out.setdefault(side, {})[key] = cli_value(raw)
    return out


def steady(records: list[dict], warm: int) -> dict | None:
    """Trained tokens/s and tokens per step between the first logged step >= warm and the last one."""
    later = [r for r in records if r["step"] >= warm]  # too few: no rate (steady_rate would use them all)
    rate = steady_rate(later, warm) if len(later) >= 2 else None
    if rate is None:
        return None
    a, b = later[0], later[-1]
    tokens = b["tokens_seen"] - a["tokens_seen"]
    return {"from_step": a["step"], "to_step": b["step"], "tokens": tokens,
            "seconds": round(b["elapsed_s"] - a["elapsed_s"], 3), "tokens_per_s": round(rate, 1),
            "tokens_per_step": round(tokens / (b["step"] - a["step"]), 1)} | stalls(later)  # fmt: skip


def stalls(records: list[dict], factor: float = 5.0, floor_s: float = 1.0) -> dict:
    """The median seconds a step in the window, and its stalls: logged intervals whose seconds a step exceed
    `factor` x the median and the median + `floor_s` (a recompile or a host pause inside the window; the
    rate above counts them, as a user's run would)."""
    per_step = [
        ((r["elapsed_s"] - q["elapsed_s"]) / (r["step"] - q["step"]), r["step"])
        for q, r in zip(records, records[1:])
        if r["step"] > q["step"]
    ]
    if not per_step:
        return {}
    median = statistics.median(d for d, _ in per_step)
    slow = [
        {"step": step, "seconds": round(d, 3)}
        for d, step in per_step
        if d > max(factor * median, median + floor_s)
    ]
    return {"median_step_s": round(median, 4), "stalls": slow}


# ---- goals and summary ------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _ok(run: dict | None) -> bool:
    return bool(run and run.get("steady"))


def _goal(name: str, arch: str, method: str, value: float | None, target: float, higher: bool) -> dict:
    passed = None if value is None else (value >= target if higher else value <= target)
    return {"goal": name, "arch": arch, "method": method, "value": None if value is None else round(value, 4),
            "target": ("≥ " if higher else "≤ ") + str(target), "pass": passed}  # fmt: skip


def loss_guard(ts: dict | None, lf: dict | None, pair: str) -> dict:
    """default pair: step-1 loss (same documents, same weights); best pair: mean loss over common steps."""
    if not (ts and lf and ts.get("losses") and lf.get("losses")):
        return {"pair": pair, "pass": None, "reason": "a run is missing or logged no loss"}
    if pair == "default":
        a, b = ts["losses"][0], lf["losses"][0]
        out = {"compared": "step-1 loss: the same documents (file order), the same initial weights", "ts": a,
               "lf": b, "rel_diff": round(_rel(a, b), 5), "tolerance": STEP1_LOSS_REL_TOL}  # fmt: skip
        n = min(len(ts["losses"]), len(lf["losses"]))
        out["max_rel_diff_all_steps"] = round(
            max(_rel(x, y) for x, y in zip(ts["losses"][:n], lf["losses"][:n])), 5
        )
    else:
        n = min(len(ts["losses"]), len(lf["losses"]))
        a, b = sum(ts["losses"][:n]) / n, sum(lf["losses"][:n]) / n
        out = {
            "compared": f"mean loss over steps 1-{n}: different packing, so different batches "
            "(an effectiveness check, not a same-token one)",
            "ts": round(a, 5), "lf": round(b, 5), "rel_diff": round(_rel(a, b), 5),
            "tolerance": MEAN_LOSS_REL_TOL,
        }  # fmt: skip
    return {"pair": pair} | out | {"pass": out["rel_diff"] <= out["tolerance"]}


def memory_goal(runs: dict[str, dict], arch: str, method: str) -> dict:
    """Peak memory at equal tokens per micro-batch: tunesmith's lowest-peak side of the best shape (ts-best or
    an --extra-side built on it, e.g. checkpointing on and tiled MLPs) against LLaMA-Factory's best.

    A side counts only when it measured a rate and (an extra side) its mean loss passes the best pair's guard
    against lf-best: a memory setting that trains differently does not count. ``best_vs_best`` keeps
    ts-best's own ratio.
    """
    lf = runs.get(f"{arch}/{method}/lf-best")
    name = "peak memory ratio at equal tokens per micro-batch"
    if not (_ok(lf) and lf.get("peak_mem_gib")):
        return _goal(name, arch, method, None, GOAL_MEMORY_RATIO, False)
    ratios = {}
    for key, run in runs.items():
        a, m, side = key.split("/")
        if (a, m) != (arch, method) or run.get("base_side", side) != "ts-best" or not side.startswith("ts-"):
            continue
        alike = side == "ts-best" or loss_guard(run, lf, "best")["pass"]  # ts-best's guard is reported anyway
        if _ok(run) and run.get("peak_mem_gib") and alike:
            ratios[side] = run["peak_mem_gib"] / lf["peak_mem_gib"]
    side = min(ratios, key=ratios.__getitem__) if ratios else None
    out = _goal(name, arch, method, ratios.get(side) if side else None, GOAL_MEMORY_RATIO, False)
    best = ratios.get("ts-best")
    return out | {"side": side, "best_vs_best": None if best is None else round(best, 4)}


def evaluate(runs: dict[str, dict], archs: list[str], methods: list[str]) -> tuple[list[dict], list[dict]]:
    """Goal checks and loss guards for every (arch, method) whose runs are present."""
    goals, guards = [], []
    for arch in archs:
        for m in methods:
            r = {s: runs.get(f"{arch}/{m}/{s}") for s in SIDES}
            rate = {s: r[s]["steady"]["tokens_per_s"] if _ok(r[s]) else None for s in SIDES}
            if m == "lora" and (r["ts-default"] or r["lf-default"]):
                v = (
                    rate["ts-default"] / rate["lf-default"]
                    if rate["ts-default"] and rate["lf-default"]
                    else None
                )
                goals.append(
                    _goal("default LoRA tokens/s ratio", arch, m, v, GOAL_DEFAULT_LORA_SPEEDUP, True)
                )
            if r["ts-best"] or r["lf-best"]:
                v = rate["ts-best"] / rate["lf-best"] if rate["ts-best"] and rate["lf-best"] else None
                goals.append(_goal("best vs best tokens/s ratio", arch, m, v, GOAL_BEST_SPEEDUP, True))
                goals.append(memory_goal(runs, arch, m))
            if arch == "llama" and m == "full" and r["ts-best"]:
                v = (r["ts-best"].get("mfu") or {}).get("mfu")
                goals.append(_goal("MFU of tunesmith best, full SFT 1B", arch, m, v, GOAL_FULL_1B_MFU, True))
            for pair in ("default", "best"):
                if r[f"ts-{pair}"] or r[f"lf-{pair}"]:
                    guards.append(
                        {"arch": arch, "method": m} | loss_guard(r[f"ts-{pair}"], r[f"lf-{pair}"], pair)
                    )
    return goals, guards


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_table(runs: dict[str, dict], goals: list[dict], guards: list[dict]) -> str:
    """A plain-text table of every run, then each goal and loss guard with pass/fail."""
    lines = [f"{'run':28} {'tokens/s':>10} {'tok/step':>9} {'peak GiB':>9} {'MFU':>6}  status"]
    for key, r in runs.items():
        s = r.get("steady") or {}
        status = (
            "ok" if s else ("skipped: " + r["skipped"] if r.get("skipped") else f"exit {r.get('exit_code')}")
        )
        if r.get("timed_out"):
            status += " (timed out)"
        m = (r.get("mfu") or {}).get("mfu")
        lines.append(
            f"{key:28} {_fmt(s.get('tokens_per_s'), ',.0f'):>10} {_fmt(s.get('tokens_per_step'), ',.0f'):>9} "
            f"{_fmt(r.get('peak_mem_gib'), '.2f'):>9} {_fmt(m and 100 * m, '.1f'):>6}  {status}"
        )
    for key, r in runs.items():
        s = r.get("steady") or {}
        for stall in s.get("stalls") or ():
            lines.append(
                f"stall [{key}]: step {stall['step']} took {stall['seconds']:.2f} s (median "
                f"{s['median_step_s']:.3f} s), counted in its tokens/s: a recompile or a host pause"
            )
    word = {True: "PASS", False: "FAIL", None: "n/a"}
    for g in goals:
        side = g.get("side")
        side = (
            f" ({side}; ts-best {_fmt(g.get('best_vs_best'), '.3f')})"
            if side not in (None, "ts-best")
            else ""
        )
        lines.append(
            f"goal {g['goal']} [{g['arch']}/{g['method']}]: {_fmt(g['value'], '.3f')}{side} "
            f"(target {g['target']}) {word[g['pass']]}"
        )
    for g in guards:
        lines.append(
            f"loss guard {g['pair']} [{g['arch']}/{g['method']}]: ts {g.get('ts')} lf {g.get('lf')} "
            f"rel {g.get('rel_diff')} (tol {g.get('tolerance')}) {word[g['pass']]}"
        )
    return "\n".join(lines)


# ---- the LLaMA-Factory child ---------------------------------------------------------------------------


def lf_child(args_path: Path, log_path: Path, info_path: Path) -> None:
    """Run LLaMA-Factory's run_exp with a callback that logs per step what tunesmith's trainer_log.jsonl has.

    Trained tokens are counted from the labels every forward call receives (a forward pre-hook on the
    model: label != -100 after the one-position shift, tunesmith's own rule); the count stays on the device
    and is read at each log event, where the Trainer syncs anyway (logging_steps 1).
    """
    import importlib.util

    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    args = json.loads(args_path.read_text())
    if args.get("flash_attn") == "best":  # FlashAttention-2 when installed, else SDPA
        args["flash_attn"] = "fa2" if importlib.util.find_spec("flash_attn") else "sdpa"
    cuda = torch.cuda.is_available()

    def peak_gib() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    class StepClock(TrainerCallback):
        def on_train_begin(self, targs, state, control, model=None, **kwargs):
            self.count = torch.zeros((), dtype=torch.int64, device=targs.device)
            model.register_forward_pre_hook(self.count_labels, with_kwargs=True)
            names = ("llamafactory", "transformers", "peft", "accelerate", "torch", "liger-kernel")
            info = {"args": args, "versions": {n: _version(n) for n in names},
                    "attn_implementation": model.config._attn_implementation,
                    "gradient_checkpointing": model.is_gradient_checkpointing}  # fmt: skip
            info_path.write_text(json.dumps(info, indent=1))
            log_path.write_text("")
            self.t0 = time.monotonic()

        def count_labels(self, module, positional, kwargs):
            labels = kwargs.get("labels")
            if labels is not None:
                self.count += (labels[..., 1:] != -100).sum()

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = round(time.monotonic() - self.t0, 3)
            record = {"step": state.global_step, "loss": logs["loss"], "tokens_seen": int(self.count),
                      "elapsed_s": elapsed, "peak_mem_gib": round(peak_gib(), 3)}  # fmt: skip
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    run_exp(args, callbacks=[StepClock()])


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "lf-run":
        raise SystemExit("usage: _train_bench_common.py lf-run ARGS.json LOG.jsonl INFO.json")
    lf_child(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
