"""The README's performance table, generated from bench/results/ (never typed by hand).

Each benchmark contributes the headline of its newest result file that has one, with the device, the
main versions, the date and the file, so every number in the README points at the raw result it came
from. `python bench/report.py` rewrites the block between the README's markers; `--check` exits 1 when
the README differs from what the results say (a test runs it, so the table cannot drift).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"
BEGIN, END = "<!-- perf-table:begin (bench/report.py) -->", "<!-- perf-table:end -->"


def _device(d: dict) -> str:
    dev = d.get("device", {})
    if isinstance(dev, str):  # a check that names its device only
        return dev.replace("NVIDIA ", "") if dev != "cpu" else "CPU"
    if dev.get("cuda"):
        count = dev.get("count", 1)
        return (
            f"{count}× {dev['name'].replace('NVIDIA ', '')}"
            if count > 1
            else dev["name"].replace("NVIDIA ", "")
        )
    cores = dev.get("usable_cores") or dev.get("logical_cores") or dev.get("cpus")
    return f"CPU, {cores} cores" if cores else "CPU"


def _versions(d: dict) -> str:
    v = d.get("versions") or {"torch": d.get("torch")}
    v = v.get("tunesmith_env", v)
    keys = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes")
    return ", ".join(f"{k} {v[k]}" for k in keys if v.get(k) and v[k] != "not installed")


def _x(v: float) -> str:
    return f"{v:.2f}×"


def data_throughput(d: dict) -> str | None:
    comp = [c for c in d.get("comparison", []) if c["side"] == "tunesmith"]
    if not comp:
        return None
    ratios = ", ".join(f"{c['case']} w={c['workers']} {_x(c['rows_per_s_ratio'])}" for c in comp)
    same = all(t.get("input_ids_identical") for t in d.get("token_check", []))
    return f"data prep rows/s vs LLaMA-Factory: {ratios}; token ids identical: {'yes' if same else 'NO'}"


def predict_throughput(d: dict) -> str | None:
    parts = []
    if d.get("ratio") and d.get("tunesmith") and d.get("llamafactory"):
        ts, lf = d["tunesmith"]["samples_per_s"], d["llamafactory"]["samples_per_s"]
        parts.append(f"predict samples/s vs LLaMA-Factory do_predict: {_x(ts / lf)} ({ts} vs {lf})")
    for c in d.get("check", []):
        if "identical" in c:
            parts.append(f"greedy = plain model.generate ({c['dtype']}): {c['identical']}/{c['prompts']}")
    return "; ".join(parts) or None


def multi_gpu(d: dict) -> str | None:
    comps = d.get("comparisons") or []
    if not comps:
        return None
    methods = list(dict.fromkeys(c["method"] for c in comps))
    several = len(methods) > 1
    cells = []
    for c in comps:
        name = f"{c['method']} {c['engine']}" if several else c["engine"]
        if "speed_ratio" in c:
            match = "loss match" if c.get("losses_match") else "LOSS DIFFERS"
            cells.append(f"{name} {_x(c['speed_ratio'])} ({match})")
        else:
            run = next((r for r in d.get("runs", []) if r.get("name") == c.get("run")), {})
            why = c.get("reason", "no result")
            if run.get("exit_code") == 124:
                why = f"timed out after {run.get('wall_s')} s"
            elif run.get("exit_code"):
                why = f"exit {run['exit_code']}"
            cells.append(f"{name}: {why}")
    sets = ", ".join(f"{k}={v}" for k, v in (d.get("sets") or {}).items())
    shape = f" (micro-batch {d.get('micro_batch')}, {sets})" if sets else ""
    return f"{' + '.join(methods)}{shape}, 2 GPUs vs 1 tokens/s: " + ", ".join(cells)


def dpo_gpu_memory(d: dict) -> str | None:
    runs = {r["reference"]: r for r in d.get("runs", []) if r.get("exit_code") == 0}
    if not {"adapter", "ref_model"} <= set(runs):
        return None
    a, r = runs["adapter"]["peak_mem_gib"], runs["ref_model"]["peak_mem_gib"]
    return f"LoRA DPO peak GiB: adapter-disabled reference {a} vs ref_model {r}"


def profile_step_gpu(d: dict) -> str | None:
    ok = [v for v in d.get("variants", []) if v.get("exit_code") == 0 and v.get("s_per_step")]
    if not ok:
        return None
    cells = ", ".join(f"{v['name']} {v['s_per_step']} s/step ({v['tokens_per_s']:,.0f} tok/s)" for v in ok)
    base = d.get("base") or {}
    methods = {
        (v.get("overrides") or {}).get("finetuning_type", base.get("finetuning_type", "lora")) for v in ok
    }
    method = " / ".join("LoRA" if m == "lora" else m for m in sorted(methods))
    arch = "Llama-3.2-1B" if base.get("template") == "llama3" else "Qwen2.5-0.5B"
    line = (
        f"{method} SFT step, {arch} arch, batch {base.get('per_device_train_batch_size', 8)}, "
        f"cutoff {base.get('cutoff_len', 1024)}{_data(d)}: {cells}"
    )
    trace = (d.get("profile") or {}).get("trace")
    if trace and trace.get("kernel_ms"):
        top, ms = next(iter(trace["by_group_ms"].items()))
        line += (
            f"; profiled {d['profile'].get('variant')}: GPU busy {trace['kernel_ms'] / trace['span_ms']:.0%}, "
            f"{top} {ms / trace['kernel_ms']:.0%} of GPU time"
        )
        idle = trace.get("host_during_idle") or {}
        phase, phase_ms = next(iter((idle.get("below_loop_ms") or {"": 0}).items()))
        if phase.endswith("_graph_for") and phase_ms > idle["idle_ms"] / 2:
            line += " (most idle time: a batch width captured during the profiled steps)"
    return line


def _data(d: dict) -> str:
    """', data NAME' for a profile of other data than alpaca_en_demo (older results do not say theirs)."""
    name = d.get("data")
    return f", data {name}" if name and name != "alpaca_en_demo.json" else ""


def export_gpu_check(d: dict) -> str | None:
    ex = d.get("exports") or []
    if not ex:
        return None
    cells = []
    for e in ex:
        ok = e.get("exit_code") == 0 and e.get("report", {}).get("ok", True) and e.get("reload")
        cells.append(f"{e['bits']}-bit {'checks pass, reloads and generates' if ok else 'FAILED'}")
    return "export: " + "; ".join(cells)


def _train_goals(d: dict) -> list[dict]:
    """The goals recomputed from the raw runs (so every file is judged by today's definitions)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import _train_bench_common as tb

    runs = d.get("runs") or {}
    archs = list(dict.fromkeys(k.split("/")[0] for k in runs))
    methods = list(dict.fromkeys(k.split("/")[1] for k in runs))
    return tb.evaluate(runs, archs, methods)[0] if runs else d.get("goals", [])


def _best_vs_best(goal: dict) -> str:
    shown = goal.get("best_vs_best") is not None and goal.get("side") != "ts-best"
    return f"; ts-best {goal['best_vs_best']}" if shown else ""


LOW_MEMORY = ":low-memory"  # key suffix of a memory goal met by a low-memory side (not ts-best)


def train_throughput_cells(d: dict) -> list[tuple[str, str]]:
    """(key, text) of each measured goal and each A/B side of a result; the key names what it measures.

    A memory goal measured with a low-memory side keys apart from one that measured only ts-best, so a later
    speed-only run does not hide the low-memory recipe's row (rows() drops the ts-best one unless it is newer).
    """
    cells = [
        (
            f"{g['arch']}:{g['method']}:{g['goal']}"
            + (LOW_MEMORY if g.get("side") not in (None, "ts-best") else ""),
            f"{g['arch']} {g['method']} {g['goal']}: {g['value']}"
            + (f" ({g['side']}{_best_vs_best(g)})" if g.get("side") is not None else "")
            + f" ({g['target']}: {'pass' if g['pass'] else 'FAIL'})",
        )
        for g in _train_goals(d)
        if g.get("value") is not None
    ]
    runs, sets = d.get("runs", {}), d.get("settings", {}).get("sets") or {}
    srcs = d.get("settings", {}).get("side_src") or {}
    for name, base in (d.get("settings", {}).get("extra_sides") or {}).items():
        for key, run in runs.items():  # an A/B in the same run: the named side against its variant
            arch, method, side = key.split("/")
            other = runs.get(f"{arch}/{method}/{base}") or {}
            if side != name or not run.get("steady") or not other.get("steady"):
                continue
            (a, b), window = _common_window(other, run)
            side_run = {base: other, name: run}
            flags = {
                s: ", ".join(
                    [f"{k}={v}" for k, v in sets.get(s, {}).items()]
                    + ([f"src {side_run[s].get('src', {}).get('digest', '?')}"] if name in srcs else [])
                )
                for s in (base, name)
            }
            label = {s: f"{s} ({flags[s]})" if flags[s] else s for s in (base, name)}
            cells.append(
                (
                    f"{arch}:{method}:ab:{label[base]}:{label[name]}",
                    f"{arch} {method} {label[base]} vs {label[name]}: {a:,.0f} vs {b:,.0f} tok/s{window}, "
                    f"{_x(a / b)}",
                )
            )
    return cells


def _common_window(x: dict, y: dict) -> tuple[tuple[float, float], str]:
    """Both runs' tokens/s over the steps both measured. An A/B's sides train the same batches, so when one
    stopped early (a time limit) the other's tokens/s is retaken over the shorter window from its per-step
    times; otherwise the steady numbers as they are."""
    sx, sy = x["steady"], y["steady"]
    rates = (sx["tokens_per_s"], sy["tokens_per_s"])
    if (sx.get("from_step"), sx.get("to_step")) == (sy.get("from_step"), sy.get("to_step")):
        return rates, ""
    x_short = sx["to_step"] < sy["to_step"]
    short, long_run = (sx, y) if x_short else (sy, x)
    elapsed = long_run.get("elapsed_s") or []
    start, stop = short["from_step"], short["to_step"]
    if start != long_run["steady"].get("from_step") or len(elapsed) < stop:
        return rates, ""
    retaken = short["tokens"] / (elapsed[stop - 1] - elapsed[start - 1])
    both = (sx["tokens_per_s"], retaken) if x_short else (retaken, sy["tokens_per_s"])
    return both, f" (steps {start}–{stop}, where both ran)"


def train_throughput(d: dict) -> str | None:
    return "; ".join(text for _, text in train_throughput_cells(d)) or None


def qlora_memory(d: dict) -> str | None:
    if d.get("mode") == "cpu-smoke":
        return None
    g = d.get("goals") or {}
    peak = (g.get("qlora_2048_peak_le_7gib") or {}).get("value_gib")
    longest = (g.get("longest_trainable_context") or {}).get("value")
    if peak is None and longest is None:
        return None
    cells = []
    if peak is not None:
        verdict = "pass" if g["qlora_2048_peak_le_7gib"]["pass"] else "FAIL"
        cells.append(f"QLoRA Llama-3.1-8B arch, seq 2048, batch 1: peak {peak} GiB (≤ 7: {verdict})")
    if longest is not None:
        cells.append(f"longest trainable context {longest:,} tokens")
    return "; ".join(cells)


def varlen_gpu_check(d: dict) -> str | None:
    if d.get("mode") != "gpu":
        return None
    c, ms, b = d["checks"], d["ms_per_fwd_bwd"], d["batch"]
    verdict = "pass" if c["pass"] else "FAIL"
    line = (
        f"varlen vs SDPA, {b['rows']} packed rows x {b['width']} ({b['documents']} documents): whole-model "
        f"fwd+bwd {ms['varlen']} vs {ms['sdpa']} ms ({_x(ms['speedup'])})"
    )
    dec = d.get("ms_per_decoder_fwd_bwd")
    if dec:
        line += f", decoder fwd+bwd {dec['varlen']} vs {dec['sdpa']} ms ({_x(dec['speedup'])})"
    return line + (
        f"; loss rel diff {c['loss_rel_diff']:.1e}, max grad rel diff "
        f"{max(c['grad_rel_l2_diff'].values()):.1e}: {verdict}"
    )


def fused_ce_gpu_check(d: dict) -> str | None:
    if d.get("device") == "cpu" or "autocast" not in d:
        return None
    sh, ms = d["shape"], {k: round(1000 * d[k]["s"], 1) for k in ("fp32", "autocast", "plain")}
    line = (
        f"fused LM head + loss, fp32 head weight (full SFT), {sh['rows']:,} rows x {sh['vocab']:,} x "
        f"{sh['hidden']:,}, fwd+bwd: matmuls in bf16 {ms['autocast']} ms vs fp32 {ms['fp32']} ms "
        f"({_x(d['speedup_autocast_vs_fp32'])}); plain logits path {ms['plain']} ms; gradients vs plain: "
        f"{'pass' if d.get('guard') == 'PASS' else 'FAIL'}"
    )
    if "triton" in d:  # the chunk math's Triton kernel (fused_ce_triton), trained head and frozen (LoRA) head
        line += (
            f"; Triton chunk kernel {1000 * d['triton']['s']:.1f} ms ({_x(d['speedup_triton_vs_autocast'])} "
            f"eager, compiled {1000 * d['compiled']['s']:.1f} ms)"
        )
        frozen = d.get("lora_head") or {}
        if "triton" in frozen:
            line += (
                f", frozen head {1000 * frozen['triton']['s']:.1f} ms vs eager "
                f"{1000 * frozen['eager']['s']:.1f} ms"
            )
    sweep = d.get("chunk_sweep") or []
    if sweep:
        line += "; chunk rows " + ", ".join(
            f"{c['head']} {c['chunk_rows']}: {1000 * c['s']:.1f} ms" for c in sweep
        )
    return line


def cuda_graph_step(d: dict) -> str | None:
    """ms per optimizer step of each variant that ran, on one fixed batch, and whether the checks pass."""
    if d.get("mode") != "gpu":
        return None
    ran = {k: v["ms_per_step"] for k, v in d.get("variants", {}).items() if v.get("ms_per_step")}
    if not ran:
        return None
    b = d["batch"]
    times = ", ".join(f"{name} {ms:.1f}" for name, ms in ran.items())
    checks = (d.get("checks") or {}).get("pass")
    mixed = ", fp32 adapters under bf16 autocast" if "--mixed" in d.get("model", "") else ""
    return (
        f"LoRA step ({b['rows']} rows, {b['tokens']:,} tokens{mixed}), ms per optimizer step: {times}; "
        f"losses and gradients vs eager and twins: {'pass' if checks else 'FAIL'}"
    )


def attention_kernels(d: dict) -> str | None:
    """Each kernel's ms a step (all layers) against PyTorch's FA2, with TFLOP/s and the numbers check."""
    sh, ks = d["shape"], d["kernels"]
    base = ks["fa2"]
    if "ms_per_step_all_layers" not in base:
        return None
    tokens = sum(s["tokens"] for s in d["steps"]) // len(d["steps"])
    parts = [
        f"fa2 {base['ms_per_step_all_layers']:.1f} ms ({base['tflops_fwd']:.0f}/{base['tflops_bwd']:.0f})"
    ]
    for name, k in ks.items():
        if name == "fa2":
            continue
        if "error" in k:
            parts.append(f"{name} failed ({k['error'].split(':')[0]})")
            continue
        verdict = "pass" if k["pass"] else "FAIL"
        parts.append(
            f"{name} {k['ms_per_step_all_layers']:.1f} ms ({k['tflops_fwd']:.0f}/{k['tflops_bwd']:.0f}, "
            f"{_x(k['speedup_vs_fa2'])}, numbers vs fa2: {verdict})"
        )
    return (
        f"causal varlen attention, {sh['heads']}/{sh['kv_heads']} heads x {sh['head_dim']}, {sh['layers']} layers, "
        f"packed steps of {tokens:,} tokens ({d['layout']}), ms a step (TFLOP/s fwd/bwd): " + "; ".join(parts)
    )


HEADLINES: dict[str, Callable[[dict], str | None]] = {
    "train_throughput": train_throughput,
    "qlora_memory": qlora_memory,
    "data_throughput": data_throughput,
    "predict_throughput": predict_throughput,
    "multi_gpu": multi_gpu,
    "profile_step_gpu": profile_step_gpu,
    "varlen_gpu_check": varlen_gpu_check,
    "dpo_gpu_memory": dpo_gpu_memory,
    "export_gpu_check": export_gpu_check,
    "fused_ce_gpu_check": fused_ce_gpu_check,
    "cuda_graph_step": cuda_graph_step,
    "attention_kernels": attention_kernels,
}


def _kind(d: dict) -> str | None:
    return d.get("bench") or d.get("benchmark")


def _row_key(kind: str, d: dict) -> str:
    """Which row of its benchmark a result's headline fills (the newest result per key is shown)."""
    if kind == "multi_gpu":  # one row per method and engine set (a rerun of some engines keeps the rest)
        methods = "+".join(dict.fromkeys(c["method"] for c in d["comparisons"]))
        engines = "+".join(c["engine"] for c in d["comparisons"])
        return f"{methods}:{engines}:{json.dumps(d.get('sets') or {})}"
    if kind == "fused_ce_gpu_check":  # a row per head shape
        return json.dumps({k: d["shape"].get(k) for k in ("rows", "hidden", "vocab")}, sort_keys=True)
    if kind == "profile_step_gpu":  # the newest profiled run, and the newest run per variant set
        if d.get("profile"):
            return f"profile:{(d.get('base') or {}).get('template')}:{d['profile'].get('variant')}{_data(d)}"
        return "timing:" + ",".join(sorted(v["name"] for v in d["variants"]))
    if kind == "qlora_memory":  # the 2048 goal and a context-only search keep their own rows
        goal = (d.get("goals") or {}).get("qlora_2048_peak_le_7gib", {})
        return "context" if goal.get("value_gib") is None else ""
    if kind == "cuda_graph_step":  # a row per batch size
        return str(d["batch"]["rows"])
    if kind == "attention_kernels":  # a row per head shape and kernel set
        return json.dumps([d["shape"], sorted(d["kernels"])], sort_keys=True)
    if kind == "predict_throughput":
        return "ratio" if d.get("ratio") else "check"
    return ""


def rows(results: Path = RESULTS) -> list[tuple[str, str, str, str, str, str]]:
    """(benchmark, headline, device, versions, date, file) of the newest result with a headline, per kind.

    multi_gpu keeps one row per method set, engine set and --set options; predict_throughput keeps the
    newest throughput run and the newest identity check; train_throughput keeps the newest measurement of
    each goal per arch and method, and of each A/B (--extra-side) pair; fused_ce_gpu_check the newest run
    per head shape; profile_step_gpu the newest profiled run per
    template and profiled variant, and the newest timing-only run per variant set; qlora_memory the newest
    run with the 2048 goal and the newest context-only search.
    """
    found: dict[tuple[str, str], tuple[str, str, dict, Path]] = {}
    for path in sorted(results.glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        kind = _kind(d)
        summary = path.with_name(path.stem + "-trace_summary.json")  # written later by --summarize-trace
        if (
            kind == "profile_step_gpu"
            and d.get("profile")
            and "trace" not in d["profile"]
            and summary.exists()
        ):
            d["profile"]["trace"] = json.loads(summary.read_text(encoding="utf-8"))
        if kind not in HEADLINES:
            continue
        if kind == "train_throughput":  # a row per goal of each arch and method, and per A/B pair
            cells = train_throughput_cells(d)
        else:
            line = HEADLINES[kind](d)
            cells = [] if line is None else [(_row_key(kind, d), line)]
        for sub, line in cells:
            if (kind, sub) not in found or d["date"] > found[(kind, sub)][0]:
                found[(kind, sub)] = (d["date"], line, d, path)
    for kind, sub in [k for k in found if k[1].endswith(LOW_MEMORY)]:
        plain = (kind, sub.removesuffix(LOW_MEMORY))
        if plain in found and found[plain][0] <= found[(kind, sub)][0]:  # a newer ts-best-only row stays too
            found.pop(plain)
    out = []
    for kind in HEADLINES:
        for (k, _), (date, line, d, path) in sorted(found.items()):
            if k == kind:
                out.append((kind, line, _device(d), _versions(d), date[:10], f"bench/results/{path.name}"))
    return out


def table(results: Path = RESULTS) -> str:
    lines = [
        BEGIN,
        "| benchmark | result | device | versions | date | raw result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, line, device, versions, date, file in rows(results):
        lines.append(f"| `{kind}` | {line} | {device} | {versions} | {date} | [{Path(file).name}]({file}) |")
    lines.append(END)
    return "\n".join(lines)


def updated_readme(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md is not up to date")
    a = p.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    new = updated_readme(current, table())
    if a.check:
        if new != current:
            print("README.md's performance table is out of date: run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote the performance table of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
