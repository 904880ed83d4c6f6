"""bench/report.py: the README's performance table is generated from bench/results and kept current."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


def test_readme_table_matches_the_results():
    assert report.main(["--check"]) == 0, "run: python bench/report.py"


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


def test_newest_result_with_a_headline_wins_and_names_its_file(tmp_path):
    gpu = {"cuda": True, "name": "NVIDIA H100 80GB HBM3", "count": 1}
    runs = [{"reference": "adapter", "exit_code": 0, "peak_mem_gib": 5.0},
            {"reference": "ref_model", "exit_code": 0, "peak_mem_gib": 6.0}]  # fmt: skip
    _write(tmp_path, "old.json", {"bench": "dpo_gpu_memory", "date": "2026-01-01T00:00:00", "device": gpu,
                                  "versions": {"torch": "2.11.0"}, "runs": runs})  # fmt: skip
    newer = [dict(r, peak_mem_gib=r["peak_mem_gib"] / 2) for r in runs]
    _write(tmp_path, "new.json", {"bench": "dpo_gpu_memory", "date": "2026-02-01T00:00:00", "device": gpu,
                                  "versions": {"torch": "2.11.0"}, "runs": newer})  # fmt: skip
    # a newer file without a headline (a failed run) does not replace the last good one
    failed = [dict(r, exit_code=1) for r in runs]
    _write(tmp_path, "failed.json", {"bench": "dpo_gpu_memory", "date": "2026-03-01T00:00:00", "device": gpu,
                                     "versions": {}, "runs": failed})  # fmt: skip
    (row,) = report.rows(tmp_path)
    assert row[0] == "dpo_gpu_memory" and "2.5 vs ref_model 3.0" in row[1]
    assert row[2] == "H100 80GB HBM3" and row[3] == "torch 2.11.0" and row[4] == "2026-02-01"
    assert row[5] == "bench/results/new.json"


def test_goals_of_the_training_bench_say_pass_or_fail():
    d = {"goals": [{"goal": "best vs best tokens/s ratio", "arch": "qwen", "method": "lora", "value": 2.4,
                    "target": "≥ 2.0", "pass": True},
                   {"goal": "MFU", "arch": "llama", "method": "full", "value": 0.31, "target": "≥ 0.45",
                    "pass": False},
                   {"goal": "skipped", "arch": "llama", "method": "lora", "value": None, "target": "≥ 2.0",
                    "pass": None}]}  # fmt: skip
    line = report.train_throughput(d)
    assert "qwen lora best vs best tokens/s ratio: 2.4 (≥ 2.0: pass)" in line
    assert "llama full MFU: 0.31 (≥ 0.45: FAIL)" in line and "skipped" not in line


def test_ab_sides_of_the_training_bench_are_shown_as_ratios():
    steady = {"qwen/lora/ts-best": 300.0, "qwen/lora/ts-best-eager": 200.0}
    d = {"goals": [{"goal": "g", "arch": "qwen", "method": "lora", "value": 1.0, "target": "≥ 2.0", "pass": False}],
         "settings": {"extra_sides": {"ts-best-eager": "ts-best"}, "sets": {"ts-best": {"torch_compile": True}}},
         "runs": {k: {"steady": {"tokens_per_s": v}} for k, v in steady.items()}}  # fmt: skip
    line = report.train_throughput(d)
    assert line == "qwen lora ts-best (torch_compile=True) vs ts-best-eager: 300 vs 200 tok/s, 1.50×"
    assert report.train_throughput(d | {"settings": {}}) is None  # no goal measured, no A/B: no row


def test_an_ab_side_that_stopped_early_is_compared_over_the_steps_both_ran():
    """ts-sync hit the time limit at step 4: ts-best's rate is retaken over steps 2-4 from its step times."""
    best = {
        "steady": {"tokens_per_s": 100.0, "from_step": 2, "to_step": 6, "tokens": 400},
        "elapsed_s": [0.5, 1.0, 2.0, 3.0, 4.0, 5.0],
    }
    sync = {
        "steady": {"tokens_per_s": 90.0, "from_step": 2, "to_step": 4, "tokens": 180},
        "elapsed_s": [0.5, 1.0, 2.0, 3.0],
    }
    d = {
        "settings": {"extra_sides": {"ts-sync": "ts-best"}},
        "runs": {"qwen/lora/ts-best": best, "qwen/lora/ts-sync": sync},
    }
    line = report.train_throughput(d)  # fmt: skip
    assert line == "qwen lora ts-best vs ts-sync: 90 vs 90 tok/s (steps 2–4, where both ran), 1.00×"


def test_an_ab_of_two_source_trees_names_both_trees():
    runs = {
        "qwen/lora/ts-best": {"steady": {"tokens_per_s": 110.0}, "src": {"digest": "aaaa"}},
        "qwen/lora/ts-base": {"steady": {"tokens_per_s": 100.0}, "src": {"digest": "bbbb"}},
    }
    d = {
        "settings": {"extra_sides": {"ts-base": "ts-best"}, "side_src": {"ts-base": "/tmp/base/src"}},
        "runs": runs,
    }
    line = report.train_throughput(d)  # fmt: skip
    assert line == "qwen lora ts-best (src aaaa) vs ts-base (src bbbb): 110 vs 100 tok/s, 1.10×"


def test_training_goals_are_recomputed_from_the_raw_runs():
    """A result file is judged by today's goal definitions (its stored goals may predate them)."""
    runs = {"qwen/lora/ts-best": {"steady": {"tokens_per_s": 90.0}, "peak_mem_gib": 9.0, "losses": [1.0]},
            "qwen/lora/lf-best": {"steady": {"tokens_per_s": 30.0}, "peak_mem_gib": 3.0, "losses": [1.0]},
            "qwen/lora/ts-mem": {"steady": {"tokens_per_s": 20.0}, "peak_mem_gib": 1.5, "losses": [1.0],
                                 "base_side": "ts-best"}}  # fmt: skip
    stale = [{"goal": "old", "arch": "qwen", "method": "lora", "value": 9.9, "target": "≥ 1", "pass": True}]
    line = report.train_throughput({"goals": stale, "runs": runs})
    assert "old" not in line and "qwen lora best vs best tokens/s ratio: 3.0 (≥ 2.0: pass)" in line
    assert (
        "peak memory ratio at equal tokens per micro-batch: 0.5 (ts-mem; ts-best 3.0) (≤ 0.7: pass)" in line
    )


def test_a_multi_gpu_run_that_timed_out_says_so():
    d = {"comparisons": [{"engine": "zero3", "method": "lora", "run": "z", "ok": False, "reason": "a run failed"}],
         "runs": [{"name": "z", "exit_code": 124, "wall_s": 114.4}]}  # fmt: skip
    assert report.multi_gpu(d) == "lora, 2 GPUs vs 1 tokens/s: zero3: timed out after 114.4 s"


def test_qlora_memory_headline_states_the_goal():
    d = {"mode": "gpu", "goals": {"qlora_2048_peak_le_7gib": {"value_gib": 6.2, "pass": True},
                                  "longest_trainable_context": {"value": 40960}}}  # fmt: skip
    assert report.qlora_memory(d) == (
        "QLoRA Llama-3.1-8B arch, seq 2048, batch 1: peak 6.2 GiB (≤ 7: pass); longest trainable context "
        "40,960 tokens"
    )
    assert report.qlora_memory(d | {"mode": "cpu-smoke"}) is None


def test_missing_markers_are_reported():
    import pytest

    with pytest.raises(SystemExit, match="markers"):
        report.updated_readme("# no table here\n", "x")


def test_fused_head_check_headline():
    d = {"device": "NVIDIA H200", "shape": {"rows": 12000, "hidden": 2048, "vocab": 128256},
         "fp32": {"s": 0.48388}, "autocast": {"s": 0.08355}, "plain": {"s": 0.04451},
         "speedup_autocast_vs_fp32": 5.79, "guard": "PASS"}  # fmt: skip
    assert report.fused_ce_gpu_check(d) == (
        "fused LM head + loss, fp32 head weight (full SFT), 12,000 rows x 128,256 x 2,048, fwd+bwd: matmuls "
        "in bf16 83.5 ms vs fp32 483.9 ms (5.79×); plain logits path 44.5 ms; gradients vs plain: pass"
    )
    assert report.fused_ce_gpu_check(d | {"device": "cpu"}) is None


def test_cuda_graph_step_headline():
    d = {"mode": "gpu", "batch": {"rows": 8, "tokens": 1399},
         "variants": {"eager": {"ms_per_step": 145.724}, "compiled_graph": {"ms_per_step": 24.753},
                      "eager_graph": {"error": "exit -11"}},
         "checks": {"pass": True}}  # fmt: skip
    assert report.cuda_graph_step(d) == (
        "LoRA step (8 rows, 1,399 tokens), ms per optimizer step: eager 145.7, compiled_graph 24.8; "
        "losses and gradients vs eager and twins: pass"
    )
    assert report.cuda_graph_step(d | {"checks": {"pass": False}}).endswith("FAIL")
    assert report.cuda_graph_step(d | {"mode": "cpu"}) is None


def test_attention_kernels_headline():
    k = {"ms_per_step_all_layers": 25.0, "tflops_fwd": 226.0, "tflops_bwd": 362.0, "speedup_vs_fa2": 1.62}
    d = {"shape": {"heads": 32, "kv_heads": 8, "head_dim": 64, "layers": 16}, "layout": "mix",
         "steps": [{"tokens": 16380}, {"tokens": 16384}],
         "kernels": {"fa2": {"ms_per_step_all_layers": 40.4, "tflops_fwd": 153.0, "tflops_bwd": 211.0},
                     "fa4": k | {"pass": True}, "cudnn": {"error": "RuntimeError: no"}}}  # fmt: skip
    assert report.attention_kernels(d) == (
        "causal varlen attention, 32/8 heads x 64, 16 layers, packed steps of 16,382 tokens (mix), ms a step "
        "(TFLOP/s fwd/bwd): fa2 40.4 ms (153/211); fa4 25.0 ms (226/362, 1.62×, numbers vs fa2: pass); "
        "cudnn failed (RuntimeError)"
    )
    d["kernels"]["fa4"]["pass"] = False
    assert "numbers vs fa2: FAIL" in report.attention_kernels(d)
    assert report.attention_kernels(d | {"kernels": {"fa2": {"error": "x"}}}) is None


H200 = {"cuda": True, "name": "NVIDIA H200", "count": 1}


def _run(tokens_per_s: float, peak: float, **extra: object) -> dict:
    return {"steady": {"tokens_per_s": tokens_per_s}, "peak_mem_gib": peak, "losses": [1.0], **extra}


def _train_files(folder: Path, *dated_runs: tuple[str, str, dict]) -> dict[str, str]:
    """Write train_throughput results (name, date, runs); the README rows they give, headline -> file."""
    for name, date, runs in dated_runs:
        _write(folder, name, {"bench": "train_throughput", "date": date, "device": H200, "versions": {},
                              "runs": runs})  # fmt: skip
    return {row[1]: row[5] for row in report.rows(folder)}


def test_each_training_goal_shows_its_newest_measurement(tmp_path):
    """A newer run that measures only the memory goal keeps the older run's best-vs-best row."""
    lf = _run(30.0, 3.0)
    both = {"qwen/lora/ts-best": _run(90.0, 9.0), "qwen/lora/lf-best": lf}
    memory = {"qwen/lora/lf-best": lf, "qwen/lora/ts-off": _run(10.0, 1.5, base_side="ts-best")}
    got = _train_files(tmp_path, ("old.json", "2026-01-01", both), ("new.json", "2026-02-01", memory))
    assert got == {
        "qwen lora best vs best tokens/s ratio: 3.0 (≥ 2.0: pass)": "bench/results/old.json",
        "qwen lora peak memory ratio at equal tokens per micro-batch: 0.5 (ts-off) (≤ 0.7: pass)": (
            "bench/results/new.json"
        ),
    }


def test_a_speed_only_run_keeps_the_low_memory_row(tmp_path):
    """A newer run of ts-best alone (its memory ratio over 0.7) does not hide the low-memory recipe's row."""
    lf = _run(30.0, 3.0)
    recipe = {"qwen/full/lf-best": lf, "qwen/full/ts-mem": _run(10.0, 1.5, base_side="ts-best")}
    fast = {"qwen/full/lf-best": lf, "qwen/full/ts-best": _run(90.0, 9.0)}
    got = _train_files(tmp_path, ("old.json", "2026-01-01", recipe), ("new.json", "2026-02-01", fast))
    assert got == {
        "qwen full best vs best tokens/s ratio: 3.0 (≥ 2.0: pass)": "bench/results/new.json",
        "qwen full peak memory ratio at equal tokens per micro-batch: 0.5 (ts-mem) (≤ 0.7: pass)": (
            "bench/results/old.json"
        ),
        "qwen full peak memory ratio at equal tokens per micro-batch: 3.0 (ts-best) (≤ 0.7: FAIL)": "bench/results/new.json",
    }
    # an older ts-best-only run gives way to the newer low-memory one
    got = _train_files(tmp_path, ("new.json", "2025-12-01", fast))
    assert (
        "qwen full peak memory ratio at equal tokens per micro-batch: 3.0 (ts-best) (≤ 0.7: FAIL)" not in got
    )
    # without a low-memory run, ts-best's own ratio is the row
    got = _train_files(tmp_path, ("old.json", "2026-01-01", {"qwen/full/lf-best": lf}))
    assert "qwen full peak memory ratio at equal tokens per micro-batch: 3.0 (ts-best) (≤ 0.7: FAIL)" in got


def test_a_profile_names_other_data_and_an_idle_time_that_was_a_capture():
    trace = {"kernel_ms": 30.0, "span_ms": 100.0, "by_group_ms": {"gemm": 15.0},
             "host_during_idle": {"idle_ms": 70.0, "below_loop_ms": {
                 "trainer.py:training_step > step_graphs.py:step > step_graphs.py:_graph_for": 60.0}}}  # fmt: skip
    d = {"base": {"cutoff_len": 2048}, "data": "bench_mix.json", "profile": {"variant": "default", "trace": trace},
         "variants": [{"name": "default", "exit_code": 0, "s_per_step": 0.05, "tokens_per_s": 70000.0}]}  # fmt: skip
    line = report.profile_step_gpu(d)
    assert "cutoff 2048, data bench_mix.json: default 0.05 s/step" in line
    assert line.endswith("GPU busy 30%, gemm 50% of GPU time (most idle time: a batch width captured during the "
                         "profiled steps)")  # fmt: skip
    trace["host_during_idle"]["below_loop_ms"] = {"trainer.py:_maybe_log_save_evaluate": 60.0}
    d["data"] = "alpaca_en_demo.json"
    line = report.profile_step_gpu(d)
    assert "cutoff 2048: default" in line and line.endswith("of GPU time")
    assert report._row_key("profile_step_gpu", d) != report._row_key(
        "profile_step_gpu", {**d, "data": "bench_mix.json"}
    )
