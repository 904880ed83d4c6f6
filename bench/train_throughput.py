"""Training throughput (issue #8): tunesmith against LLaMA-Factory 0.9.5 on the same GPU, in one run.

Matrix: arch (qwen = Qwen2.5-0.5B, llama = Llama-3.2-1B; published configs, random init, bf16, real
tokenizers) x method (lora: rank 8 on all linear layers; full) x side:

- lf-default: LLaMA-Factory's example yaml: batch 1 x 8 accumulation, no packing, its attention `auto`.
- lf-best:    packing + neat_packing + enable_liger_kernel + flash_attn fa2 when flash_attn is importable in
              its environment, else sdpa; batch --best-batch (8) packed rows of cutoff_len, accumulation 1.
- ts-default: tunesmith's defaults with the same rows per optimizer step: batch 8 x 1, no packing.
- ts-best:    packing + neat_packing, batch --best-batch, accumulation 1 (--set ts-best:KEY=VALUE adds flags).

Equal tokens per optimizer step: each pair sees the same rows per step (default pair: 8 documents; best
pair: 8 packed rows of cutoff_len, 2048, so the same tokens per micro-batch too); the measured
tokens/step of both sides are in the results. Data: LLaMA-Factory's alpaca_en_demo (999 rows) plus 200
deterministic long rows (answers of 6-24k characters, ~1.5-6k tokens, so cutoff_len truncates them), shuffled
once into one file (`--long-prompts`: every row a long prompt with a one-word answer, the same texts, for
data whose trained tokens are a small share); the default pair reads it in file order (lf `disable_shuffling`, ts
`train_sampling_strategy: sequential`: a fixed random order, so it changes no batch statistics), so both see
the same documents in every optimizer step. Common keys: lr 1e-4 (lora) / 1e-5 (full), cosine, warmup
steps/10, seed 42, logging every step, no checkpoints. Every run is a child process on the same GPU.
Both tools tokenize this data to the same input tokens (checked with bench/lf_preprocess.py: equal totals
for both tokenizers, and equal trained tokens with llama3; qwen: LLaMA-Factory trains the "\\n" after
<|im_end|> too, +0.2%).

Metrics (each run, written to --out as soon as it ends; an existing --out keeps its other runs):
- trained tokens/s over steps --warm (10) .. end (--default-steps shortens both default sides alike, so
  their windows hold the same documents): tokens whose label is not -100 after the causal shift
  (padding and prompt excluded), counted by each side from the batches it really trained on. tunesmith:
  its trainer_log.jsonl (it counts exactly this per micro-batch on the device). LLaMA-Factory: its own
  log has only whole-second times and no trained-token count (include_effective_tokens_per_second counts
  the dataset's input tokens once at the end), so the LF child adds one callback with a forward pre-hook
  on the model that applies tunesmith's counting rule to the labels of every forward call and writes
  the same per-step record (step, loss, tokens, elapsed, peak memory). Both read the count and the clock
  at each log event, where the Trainer synchronises anyway.
- peak GPU memory: torch.cuda.max_memory_allocated of the training process (both sides).
- MFU = trained tokens/s x model FLOPs per trained token / peak bf16 dense FLOP/s (989.4 T on H100 SXM and
  H200; --peak-tflops otherwise). FLOPs per trained token (see _train_bench_common.flops_per_trained_token)
  come from the tokenized data set (tunesmith's tokenization, after truncation): full = 6N over every
  input token for the decoder layers (N: non-embedding matmul weights) + 6 x vocab x hidden for the head
  on trained tokens; lora = 4N (forward + input-gradient backward of the frozen base) + 6 x LoRA params,
  head 4 x vocab x hidden; attention 12 x layers x heads x head_dim per causal query-key pair within a
  document, for both. Recomputation by gradient checkpointing is not counted (model FLOPs, not hardware).
- loss guard: default pair: step-1 loss (before any update, so the same weights; the same 8 documents) within
  1% (LLaMA-Factory also trains the "\\n" after <|im_end|> with the qwen template, one token a row); best
  pair: different packing means different batches, so only the mean loss over the common steps is
  compared (3%), an effectiveness check and labelled so.

Goals (pass/fail in the summary): ts-default / lf-default LoRA tokens/s >= 50; ts-best / lf-best >= 2 (lora,
full, both archs); ts-best full SFT llama MFU >= 45%; ts-best / lf-best peak memory <= 0.7.

On the device (LLaMA-Factory's wheels in .whl/lf with liger-kernel, installed into /tmp/lf; the whole
matrix does not fit one 10-minute call: one call per arch, then --merge the earlier file to finish
whatever --budget-s skipped):

    python3 bench/lf_device_env.py install --wheels .whl/lf --target /tmp/lf --tunesmith-target /tmp/ts
    PYTHONPATH=/tmp/ts:src python3 bench/train_throughput.py --qwen-tokenizer .device/qwen-tok \\
        --llama-tokenizer .device/llama-tok --data .device/alpaca_en_demo.json --lf-pythonpath /tmp/lf \\
        --archs qwen --default-steps 20 --budget-s 510 --out $OUT/train_throughput-qwen.json
    python bench/train_throughput.py --cpu-smoke --lf-python bench/.venv-llamafactory/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_bench_common as tb  # noqa: E402
from _common import ALPACA_DEMO, QWEN_TOKENIZER, SHARED  # noqa: E402
from multi_gpu import REPO, child_env, run_cli  # noqa: E402
from predict_throughput import _env as lf_env  # noqa: E402
from train_gpu_smoke import build_model, device, versions  # noqa: E402

BENCH = Path(__file__).resolve().parent
LLAMA_TOKENIZER = SHARED / "fixtures" / "hf_tokenizers" / "llama-3.2-instruct"
MIN_RUN_S = 60  # a run is started only with at least this much of --budget-s left
_TS_MODEL_LINE = re.compile(r"attention (\S+) \| gradient checkpointing (\w+)")
_TS_AUTO_CKPT_LINE = re.compile(r"gradient checkpointing (on|off) \(auto\)")  # decided on the GPU, later
_TS_AUTO_ESTIMATE = re.compile(r"about ([\d.]+) GiB without it at ([\d,]+) tokens per micro-batch")
_TS_VARLEN_KERNEL = re.compile(r"flash_attn: varlen kernel: (\S+)")


def ts_model_info(output: str) -> dict:
    """Attention and gradient checkpointing from tunesmith's log (`auto` checkpointing is decided later)."""
    found = _TS_MODEL_LINE.search(output)
    info = {"attn_implementation": found[1], "gradient_checkpointing": found[2] == "on"} if found else {}
    kernel = _TS_VARLEN_KERNEL.search(output)
    if kernel:
        info["varlen_kernel"] = kernel[1]
    auto = _TS_AUTO_CKPT_LINE.search(output)
    if auto:
        info |= {"gradient_checkpointing": auto[1] == "on", "gradient_checkpointing_auto": True}
        estimate = _TS_AUTO_ESTIMATE.search(output[auto.start() :])
        if estimate:  # the plan's peak without checkpointing, to hold against the measured peak
            info |= {
                "auto_estimate_gib": float(estimate[1]),
                "auto_estimate_tokens": int(estimate[2].replace(",", "")),
            }
    return info


def build_llama(out: Path, tokenizer_dir: Path) -> Path:
    """Llama-3.2-1B architecture, random init (on the GPU when there is one), saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in tb.LLAMA32_1B.items() if k not in ("architectures", "model_type")}
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training children need the memory, not this process
    return out


def arch_model(a: argparse.Namespace, arch: str) -> Path:
    """The model folder of an arch, built once per --work (a stamp marks a finished build)."""
    if a.cpu_smoke:
        from tunesmith.tiny_model import build_tiny_model

        return build_tiny_model(a.work / "tiny-model")
    out = a.work / f"{arch}-random"
    stamp = out / "bench_built.json"
    if stamp.exists() and json.loads(stamp.read_text()) == tb.ARCHS[arch]:
        return out
    (build_model if arch == "qwen" else build_llama)(
        out, a.qwen_tokenizer if arch == "qwen" else a.llama_tokenizer
    )
    stamp.write_text(json.dumps(tb.ARCHS[arch]))
    return out


def data_stats(model: Path, arch: str, a: argparse.Namespace) -> tb.DataStats:
    """Token totals of the training rows as tunesmith tokenizes them (its runs then reuse its cache)."""
    from tunesmith.config import load_config
    from tunesmith.model.loader import load_tokenizer
    from tunesmith.training.setup import prepare_data, template_for

    cfg = load_config(
        None,
        {
            "model_name_or_path": str(model),
            "stage": "sft",
            "do_train": True,
            "dataset": tb.DATASET,
            "dataset_dir": str(a.work / "data"),
            "template": tb.TEMPLATES[arch],
            "cutoff_len": a.cutoff_len,
            "output_dir": str(a.work / "stats"),
            "data_cache_dir": str(a.work / "cache"),
        },
    )
    tokenizer = load_tokenizer(str(model))
    rows = prepare_data(cfg, tokenizer, template_for(cfg, tokenizer), "sft").prepared.train
    return tb.DataStats.of(rows.lengths().tolist(), rows.supervised_tokens())


def _records(path: Path, keys: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in keys} for r in rows if r.get("loss") is not None]


def ts_env(a: argparse.Namespace, side: str) -> dict[str, str]:
    """A tunesmith side's environment: this checkout's src first on PYTHONPATH, or the side's own source tree
    (--side-src) before it."""
    env = child_env(a, 1, "ddp")
    if side in a.side_src:
        env["PYTHONPATH"] = os.pathsep.join([a.side_src[side], env["PYTHONPATH"]])
    return env


def run_side(
    a: argparse.Namespace, plan: tb.Plan, model: Path, arch: str, method: str, side: str, timeout: float
) -> dict:
    """One training run of one side in a child process; its per-step records reduced to the metrics."""
    base = tb.base_side(side, a.extra)
    steps = a.default_steps if base.endswith("-default") else a.steps
    name = f"{arch}-{method}-{side}"
    out = a.work / "out" / name
    cfg = tb.common_keys(model, arch, method, str(a.work / "data"), steps, plan) | tb.side_keys(base, plan)
    cfg |= a.sets.get(side, {})
    cfg["output_dir"] = str(out)
    keys = ("step", "loss", "tokens_seen", "elapsed_s", "peak_mem_gib")
    if side.startswith("ts-"):
        cfg.setdefault("data_cache_dir", str(a.work / "cache"))
        path = a.work / f"{name}.yaml"
        path.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
        cmd = [sys.executable, "-m", "tunesmith.cli", "train", str(path)]
        rc, output, wall = run_cli(cmd, ts_env(a, side), timeout)
        records = _records(out / "trainer_log.jsonl", keys)
        info = ts_model_info(output)
    else:
        args_path, log, info_path = (
            a.work / f"{name}{ext}" for ext in (".json", ".steps.jsonl", ".info.json")
        )
        args_path.write_text(json.dumps(cfg, indent=1))
        log.unlink(missing_ok=True)
        info_path.unlink(missing_ok=True)
        cmd = [
            a.lf_python or sys.executable,
            str(BENCH / "_train_bench_common.py"),
            "lf-run",
            str(args_path),
            str(log),
            str(info_path),
        ]
        smoke = (
            {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
            if a.cpu_smoke
            else {"CUDA_VISIBLE_DEVICES": "0"}
        )
        env = lf_env(a.lf_pythonpath, DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false", **smoke)
        rc, output, wall = run_cli(cmd, env, timeout)
        records = _records(log, keys)
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info["flash_attn"] = info.pop("args", {}).get("flash_attn")  # "best" resolved in the child
    result = {
        "arch": arch,
        "method": method,
        "side": side,
        "base_side": base,
        "tool": "tunesmith" if side.startswith("ts-") else "llamafactory",
        "config": cfg,
        "exit_code": rc,
        "timed_out": rc == 124,
        "wall_s": round(wall, 1),
        "info": info,
        "steps_logged": len(records),
        "losses": [r["loss"] for r in records],
        "elapsed_s": [r["elapsed_s"] for r in records],  # per logged step: stalls, captures
        "steady": tb.steady(records, a.warm),
        # seconds from the trainer's start to the end of step 1: model warm-up, and a torch_compile's compile
        "first_step_s": next((r["elapsed_s"] for r in records if r["step"] == 1), None),
        "peak_mem_gib": max((r["peak_mem_gib"] or 0 for r in records), default=None),
    }
    if side.startswith("ts-"):
        src = Path(a.side_src.get(side, REPO / "src"))  # the source tree it ran, identified by content
        result["src"] = {"dir": str(src), "digest": tb.src_digest(src)}
        # what the trainer decided about CUDA graphs (training.step_graphs)
        watched = ("cuda graphs", "AccumulateGrad", "capturing")
        result["cuda_graphs_log"] = [
            line[-600:] for line in output.splitlines() if any(w in line for w in watched)
        ][:6]
        # and which layers it swapped for fused kernels (model/fused_layers.py)
        result["fused_layers_log"] = [line[-600:] for line in output.splitlines() if "fused layers:" in line][
            :2
        ]
    if rc != 0:
        result["output_tail"] = output[-6000:]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qwen-tokenizer", type=Path, default=QWEN_TOKENIZER)
    p.add_argument("--llama-tokenizer", type=Path, default=LLAMA_TOKENIZER)
    p.add_argument("--data", type=Path, default=ALPACA_DEMO, help="alpaca_en_demo.json")
    p.add_argument("--archs", nargs="+", default=list(tb.ARCHS), choices=list(tb.ARCHS))
    p.add_argument("--methods", nargs="+", default=list(tb.METHODS), choices=list(tb.METHODS))
    p.add_argument(
        "--sides",
        nargs="+",
        default=list(tb.SIDES),
        help=f"in run order: {', '.join(tb.SIDES)} or an --extra-side",
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--default-steps",
        type=int,
        default=None,
        help="steps of the default pair, both sides: the same documents in the window (default --steps)",
    )
    p.add_argument("--warm", type=int, default=10, help="tokens/s counts from this logged step to the last")
    p.add_argument("--cutoff-len", type=int, default=2048)
    p.add_argument("--default-rows", type=int, default=8, help="rows per optimizer step, default pair")
    p.add_argument("--best-batch", type=int, default=8, help="packed rows per micro-batch, best pair")
    p.add_argument("--long-rows", type=int, default=200)
    p.add_argument(
        "--long-prompts",
        action="store_true",
        help="every row a long prompt with a one-word answer (the same texts; a small trained share)",
    )
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SIDE:KEY=VALUE")
    p.add_argument(
        "--extra-side",
        dest="extra",
        action="append",
        default=[],
        metavar="NAME=BASE",
        help="one more run per arch/method: BASE's config plus --set NAME:... (an A/B in the same run)",
    )
    p.add_argument(
        "--side-src",
        dest="side_src",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="the tunesmith --extra-side NAME runs the package in DIR (the src folder of another commit): "
        "an A/B of code, not of a config key",
    )
    p.add_argument("--run-timeout", type=float, default=300, help="seconds per run (SIGINT, then kill)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting runs past this many seconds")
    p.add_argument("--lf-pythonpath", default="", help="folder of LLaMA-Factory and its pins (lf_device_env)")
    p.add_argument("--lf-python", default=None, help="python of a LLaMA-Factory venv (instead)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny model and tokenizer, qwen only, 4 steps, cutoff 128, LoRA (all 4 sides)",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-train-throughput"))
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON; an existing one keeps its other runs"
    )
    p.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier results JSON: its runs are kept and those it completed are not rerun",
    )
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.archs, a.steps, a.warm, a.cutoff_len = ["qwen"], 4, 1, 128
        a.default_rows, a.best_batch, a.long_rows = 4, 2, 8
        if "--methods" not in (argv if argv is not None else sys.argv):
            a.methods = ["lora"]
    a.default_steps = a.default_steps or a.steps
    if any(s.startswith("lf-") for s in a.sides) and not (a.lf_pythonpath or a.lf_python):
        p.error("LLaMA-Factory sides need --lf-pythonpath or --lf-python (or leave them out of --sides)")
    if a.lf_python and not a.lf_pythonpath:
        from llamafactory_env import write_stubs  # its torchaudio stub

        a.lf_pythonpath = str(write_stubs())
    try:
        a.extra = tb.parse_extra_sides(a.extra)
        a.sets = tb.parse_sets(a.sets, a.extra)
        a.side_src = tb.parse_side_src(a.side_src, a.extra)
    except ValueError as e:
        p.error(str(e))
    unknown = [s for s in a.sides if s not in tb.SIDES and s not in a.extra]
    if unknown:
        p.error(f"--sides: unknown {', '.join(unknown)}; allowed: {', '.join([*tb.SIDES, *a.extra])}")
    a.sides += [s for s in a.extra if s not in a.sides]  # extra sides run after the listed ones
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    a.work.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = a.out or BENCH / "results" / f"train_throughput-{date.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = device()
    plan = tb.Plan(a.cutoff_len, a.default_rows, a.best_batch, bf16=dev["cuda"], gpu=dev["cuda"])
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (tb.peak_flops(dev["name"]) if dev["cuda"] else None)
    results: dict = json.loads(out.read_text()) if out.exists() else {"runs": {}, "archs": {}}
    done = json.loads(a.merge.read_text())["runs"] if a.merge else {}
    results["runs"] = done | results["runs"]
    results |= {
        "bench": "train_throughput",
        "date": date,
        "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
        "device": dev,
        "versions": versions(),
        "peak_flops": peak,
        "definitions": tb.DEFINITIONS,
        "settings": asdict(plan)
        | {
            "steps": a.steps,
            "default_steps": a.default_steps,
            "warm": a.warm,
            "sets": a.sets,
            "extra_sides": a.extra,
            "side_src": a.side_src,
            "lf_pythonpath": a.lf_pythonpath,
        },
        "data": tb.write_bench_data(
            a.data, a.work / "data", a.long_rows, 64 if a.cpu_smoke else None, long_prompts=a.long_prompts
        ),
    }

    def save() -> None:
        results["goals"], results["loss_guards"] = tb.evaluate(
            results["runs"], list(tb.ARCHS), list(tb.METHODS)
        )
        results["total_wall_s"] = round(time.monotonic() - t0, 1)
        out.write_text(json.dumps(results, indent=1))

    for arch in a.archs:
        try:  # a model that cannot be built (e.g. a tokenizer that does not load) costs only its own runs
            model = arch_model(a, arch)
            stats = data_stats(model, arch, a)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the other arch still runs
            results["archs"][arch] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[bench] {arch}: could not prepare the model or data: {e}", file=sys.stderr, flush=True)
            save()
            continue
        shape = tb.Shape.of(json.loads((model / "config.json").read_text()))
        fpt = {m: tb.flops_per_trained_token(shape, m, stats) for m in tb.METHODS}
        results["archs"][arch] = {
            "model": str(model),
            "shape": asdict(shape),
            "params": shape.params(8),
            "data_stats": asdict(stats),
            "flops_per_trained_token": fpt,
        }
        save()
        for method in a.methods:
            for side in a.sides:
                key = f"{arch}/{method}/{side}"
                if (done.get(key) or {}).get("steady"):
                    print(f"[bench] {key}: kept from --merge", flush=True)
                    continue
                left = float("inf") if a.budget_s is None else a.budget_s - (time.monotonic() - t0)
                if left < MIN_RUN_S:
                    if key not in results["runs"]:
                        results["runs"][key] = {
                            "arch": arch,
                            "method": method,
                            "side": side,
                            "skipped": "budget",
                        }
                    print(f"[bench] {key}: skipped, {left:.0f} s of --budget-s left", flush=True)
                    continue
                run = run_side(a, plan, model, arch, method, side, min(a.run_timeout, left - 10))
                rate = (run["steady"] or {}).get("tokens_per_s")
                run["mfu"] = {
                    "mfu": tb.mfu(rate, fpt[method]["total"], peak),
                    "peak_flops": peak,
                    "flops_per_trained_token": fpt[method]["total"],
                }
                results["runs"][key] = run
                save()
                shown = {k: run.get(k) for k in ("exit_code", "wall_s", "steps_logged", "peak_mem_gib")}
                print(f"[bench] {key}: {json.dumps(shown | {'steady': run['steady']})}", flush=True)
                if run["exit_code"] != 0 and not run["steady"]:
                    print(run["output_tail"][-3000:], file=sys.stderr)
    save()
    print(tb.summary_table(results["runs"], results["goals"], results["loss_guards"]))
    print(f"wrote {out} ({results['total_wall_s']} s)")
    # 0 only when every selected run measured a rate (a failed, skipped or too short run: 1)
    wanted = [f"{x}/{m}/{s}" for x in a.archs for m in a.methods for s in a.sides]
    return 0 if all((results["runs"].get(k) or {}).get("steady") for k in wanted) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    raise SystemExit(main())
