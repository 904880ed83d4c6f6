"""bench/train_throughput.py: shapes vs published parameter counts, FLOPs/MFU arithmetic, side configs, goals,
loss guards, data files; and (slow) the --cpu-smoke run of all four sides against LLaMA-Factory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import _train_bench_common as tb  # noqa: E402

LF_PYTHON = REPO / "bench" / ".venv-llamafactory" / "bin" / "python"
ALPACA = REPO.parent / "shared" / "compat" / "llamafactory-data" / "alpaca_en_demo.json"


def _norms_and_biases(cfg: dict) -> int:
    shape = tb.Shape.of(cfg)
    norms = (2 * shape.layers + 1) * shape.hidden
    biases = (
        shape.layers * (shape.heads + 2 * shape.kv_heads) * shape.head_dim
        if cfg["model_type"] == "qwen2"
        else 0
    )
    return norms + biases


@pytest.mark.parametrize(("arch", "published"), [("qwen", 494_032_768), ("llama", 1_235_814_400)])
def test_shape_params_add_up_to_the_published_parameter_count(arch: str, published: int) -> None:
    cfg = tb.ARCHS[arch]
    p = tb.Shape.of(cfg).params(8)
    # tied embeddings: the head matrix is the embedding matrix, counted once
    assert p["body"] + p["head"] + _norms_and_biases(cfg) == published


def _tiny_shape() -> tb.Shape:
    return tb.Shape(layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2, ffn=8, vocab=10)


def test_flops_per_trained_token_by_hand() -> None:
    shape = _tiny_shape()
    # linears (in, out): q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8, down 8x4 -> 144 weights; LoRA r8: 8 x 64
    assert shape.params(8) == {"body": 144, "head": 40, "lora": 512}
    stats = tb.DataStats.of([3, 5], trained_tokens=4)
    assert (stats.input_tokens, stats.attn_pairs) == (8, 6 + 15)
    full = tb.flops_per_trained_token(shape, "full", stats)
    # 6 x 144 x (8 / 4) + 6 x 40 + 12 x 1 layer x 4 (heads x head_dim) x 21 pairs / 4 trained tokens
    assert (full["dense"], full["head"], full["attention"], full["total"]) == (1728, 240, 252, 2220)
    lora = tb.flops_per_trained_token(shape, "lora", stats)
    assert (lora["dense"], lora["head"], lora["attention"]) == ((4 * 144 + 6 * 512) * 2, 160, 252)
    assert lora["input_per_trained_token"] == 2.0


def test_mfu_and_peak_flops() -> None:
    assert tb.mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
    assert tb.mfu(None, 1e9, 1e12) is None and tb.mfu(1.0, 1e9, None) is None
    assert tb.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert tb.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert tb.peak_flops("NVIDIA H200") == 989.4e12
    assert tb.peak_flops("NVIDIA A100-SXM4-80GB") is None


def test_pairs_get_equal_rows_and_tokens_per_step() -> None:
    plan = tb.Plan(default_rows=8, best_batch=6)
    k = {s: tb.side_keys(s, plan) for s in tb.SIDES}

    def rows(side: str) -> int:
        return k[side]["per_device_train_batch_size"] * k[side]["gradient_accumulation_steps"]

    assert (k["lf-default"]["per_device_train_batch_size"], rows("lf-default")) == (1, 8)
    assert rows("ts-default") == 8
    for side in ("ts-best", "lf-best"):  # equal packed rows per micro-batch: equal tokens per micro-batch
        assert (k[side]["packing"], k[side]["neat_packing"], rows(side)) == (True, True, 6)
    assert k["lf-best"]["enable_liger_kernel"] is True
    assert "enable_liger_kernel" not in tb.side_keys("lf-best", tb.Plan(gpu=False))
    # the default pair reads the file in order on both sides
    assert k["lf-default"]["disable_shuffling"] and k["ts-default"]["train_sampling_strategy"] == "sequential"
    with pytest.raises(ValueError, match="unknown side"):
        tb.side_keys("ts-fast", plan)


@pytest.mark.parametrize("side", ["ts-default", "ts-best"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_tunesmith_side_configs_load(tmp_path: Path, side: str, method: str) -> None:
    from tunesmith.config import load_config

    plan = tb.Plan()
    keys = tb.common_keys(tmp_path / "model", "llama", method, str(tmp_path), 60, plan) | tb.side_keys(
        side, plan
    )
    cfg = load_config(None, keys | {"output_dir": str(tmp_path / "out")})
    assert cfg.data.cutoff_len == 2048 and cfg.data.packing is (side == "ts-best")
    assert cfg.finetuning.finetuning_type == method


def test_parse_sets() -> None:
    assert tb.parse_sets(["ts-best:disable_gradient_checkpointing=true", "lf-best:flash_attn=sdpa"]) == {
        "ts-best": {"disable_gradient_checkpointing": True},
        "lf-best": {"flash_attn": "sdpa"},
    }
    for bad in ("ts-best", "nobody:x=1", "ts-best:=1"):
        with pytest.raises(ValueError, match="SIDE:key=value"):
            tb.parse_sets([bad])


def test_extra_sides_are_a_named_side_plus_their_own_flags() -> None:
    extra = tb.parse_extra_sides(["ts-best-eager=ts-best"])
    assert extra == {"ts-best-eager": "ts-best"} and tb.base_side("ts-best-eager", extra) == "ts-best"
    assert tb.parse_sets(["ts-best-eager:torch_compile=false"], extra) == {
        "ts-best-eager": {"torch_compile": False}
    }
    for bad in ("ts-x=lf-best", "ts-best=ts-default", "ts-x=nobody", "ts-x"):
        with pytest.raises(ValueError, match="NAME=BASE"):
            tb.parse_extra_sides([bad])


def _records(n: int, tokens: int = 100, seconds: float = 0.5) -> list[dict]:
    return [
        {"step": s, "tokens_seen": s * tokens, "elapsed_s": 2.0 + s * seconds, "loss": 1.0}
        for s in range(1, n + 1)
    ]


def test_side_src_names_an_extra_tunesmith_side_and_a_src_folder(tmp_path: Path) -> None:
    extra = tb.parse_extra_sides(["ts-base=ts-best"])
    (tmp_path / "tunesmith").mkdir()
    (tmp_path / "tunesmith" / "__init__.py").write_text("")
    assert tb.parse_side_src([f"ts-base={tmp_path}"], extra) == {"ts-base": str(tmp_path.resolve())}
    for bad in (f"ts-best={tmp_path}", f"ts-other={tmp_path}", f"ts-base={tmp_path / 'nope'}", "ts-base"):
        with pytest.raises(ValueError, match="--side-src"):
            tb.parse_side_src([bad], extra)
    digest = tb.src_digest(tmp_path)
    (tmp_path / "tunesmith" / "x.py").write_text("y = 1\n")
    assert len(digest) == 12 and tb.src_digest(tmp_path) != digest


def test_a_side_src_side_runs_the_other_tree(tmp_path: Path) -> None:
    """The extra side's child imports tunesmith from its --side-src folder: here a tree whose CLI writes a
    marker and exits 3, and the run records that exit and the tree's digest."""
    import train_throughput

    data = tmp_path / "alpaca.json"  # the smoke's 64 rows, written here: no ../shared needed
    data.write_text(
        json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(64)])
    )
    other = tmp_path / "other-src"
    (other / "tunesmith").mkdir(parents=True)
    (other / "tunesmith" / "__init__.py").write_text("")
    marker = tmp_path / "ran-the-other-tree"
    (other / "tunesmith" / "cli.py").write_text(
        f"import pathlib, sys\npathlib.Path({str(marker)!r}).touch()\nsys.exit(3)\n"
    )
    out = tmp_path / "r.json"
    args = ["--cpu-smoke", "--data", str(data), "--sides", "ts-base", "--extra-side", "ts-base=ts-best",
            "--side-src", f"ts-base={other}", "--work", str(tmp_path / "w"), "--out", str(out)]  # fmt: skip
    train_throughput.main(args)
    run = json.loads(out.read_text())["runs"]["qwen/lora/ts-base"]
    assert marker.exists() and run["exit_code"] == 3
    assert run["src"] == {"dir": str(other.resolve()), "digest": tb.src_digest(other)}


def test_steady_counts_from_the_warm_step() -> None:
    got = tb.steady(_records(60), warm=10)
    assert got == {"from_step": 10, "to_step": 60, "tokens": 5000, "seconds": 25.0,
                   "tokens_per_s": 200.0, "tokens_per_step": 100.0, "median_step_s": 0.5,
                   "stalls": []}  # fmt: skip
    assert tb.steady(_records(10), warm=10) is None  # one record past warm-up: no rate


def test_a_stall_inside_the_window_is_named_and_still_counted() -> None:
    """A mid-run recompile (one step of 5.2 s among steps of 0.5 s) is reported with its step, and the rate
    keeps counting it; intervals of several logged steps are compared per step."""
    records = _records(60)
    for r in records[34:]:
        r["elapsed_s"] += 4.7  # step 35 took 5.2 s
    got = tb.steady(records, warm=10)
    assert got["stalls"] == [{"step": 35, "seconds": 5.2}] and got["median_step_s"] == 0.5
    assert got["tokens_per_s"] == round(5000 / 29.7, 1)
    every_5 = [r for r in _records(60) if r["step"] % 5 == 0]
    assert tb.steady(every_5, warm=10)["stalls"] == [] and tb.steady(every_5, warm=10)["median_step_s"] == 0.5
    table = tb.summary_table({"llama/full/ts-best": {"steady": got, "peak_mem_gib": 1.0}}, [], [])
    assert "stall [llama/full/ts-best]: step 35 took 5.20 s (median 0.500 s)" in table


def _run(
    rate: float | None, mem: float = 10.0, losses: tuple[float, ...] = (11.9, 11.5), mfu: float = 0.5
) -> dict:
    steady = {"tokens_per_s": rate, "tokens_per_step": 100.0} if rate else None
    return {"steady": steady, "peak_mem_gib": mem, "losses": list(losses), "mfu": {"mfu": mfu}}


def test_evaluate_goals_and_guards() -> None:
    runs = {
        "qwen/lora/ts-default": _run(60_000.0, losses=(11.90, 11.0)),
        "qwen/lora/lf-default": _run(1_000.0, losses=(11.95, 11.2)),
        "qwen/lora/ts-best": _run(50_000.0, mem=6.0),
        "qwen/lora/lf-best": _run(30_000.0, mem=10.0, losses=(11.9, 10.0)),
        "llama/full/ts-best": _run(20_000.0, mfu=0.40),
    }
    goals, guards = tb.evaluate(runs, list(tb.ARCHS), list(tb.METHODS))
    got = {(g["goal"], g["arch"], g["method"]): (g["value"], g["pass"]) for g in goals}
    assert got[("default LoRA tokens/s ratio", "qwen", "lora")] == (60.0, True)
    assert got[("best vs best tokens/s ratio", "qwen", "lora")] == (pytest.approx(1.6667), False)
    assert got[("peak memory ratio at equal tokens per micro-batch", "qwen", "lora")] == (0.6, True)
    assert got[("MFU of tunesmith best, full SFT 1B", "llama", "full")] == (0.4, False)
    assert got[("best vs best tokens/s ratio", "llama", "full")] == (None, None)  # lf-best missing
    by_pair = {(g["arch"], g["pair"]): g for g in guards}
    assert by_pair[("qwen", "default")]["pass"] is True  # step-1: 11.90 vs 11.95 (0.4%)
    assert by_pair[("qwen", "best")]["pass"] is False  # mean 11.7 vs 10.95 (6.8%)
    assert by_pair[("llama", "best")]["pass"] is None
    table = tb.summary_table(runs, goals, guards)
    assert "qwen/lora/ts-default" in table and "PASS" in table and "FAIL" in table and "n/a" in table


def test_memory_goal_takes_the_lowest_ts_side_of_the_best_shape_that_trains_alike() -> None:
    runs = {
        "qwen/lora/ts-best": _run(50_000.0, mem=19.0) | {"base_side": "ts-best"},
        "qwen/lora/lf-best": _run(30_000.0, mem=3.0),
        "qwen/lora/ts-mem": _run(20_000.0, mem=2.0) | {"base_side": "ts-best"},
        "qwen/lora/ts-wrong": _run(20_000.0, mem=1.0, losses=(5.0, 4.0)) | {"base_side": "ts-best"},
        "qwen/lora/ts-small": _run(90_000.0, mem=0.5) | {"base_side": "ts-default"},  # not the best shape
        "qwen/lora/ts-none": _run(None, mem=0.2) | {"base_side": "ts-best"},  # no rate measured
    }
    goal = tb.memory_goal(runs, "qwen", "lora")
    assert (goal["side"], goal["value"], goal["pass"], goal["best_vs_best"]) == (
        "ts-mem",
        0.6667,
        True,
        6.3333,
    )
    assert "(ts-mem; ts-best 6.333)" in tb.summary_table(runs, [goal], [])
    del runs["qwen/lora/lf-best"]
    assert tb.memory_goal(runs, "qwen", "lora")["value"] is None


def test_bench_data_is_deterministic_and_long(tmp_path: Path) -> None:
    src = tmp_path / "alpaca.json"
    rows = [
        {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}. " * (20 + i)}
        for i in range(30)
    ]
    src.write_text(json.dumps(rows))
    meta = tb.write_bench_data(src, tmp_path / "a", n_long=5)
    tb.write_bench_data(src, tmp_path / "b", n_long=5)
    first = (tmp_path / "a" / "bench_mix.json").read_text()
    assert first == (tmp_path / "b" / "bench_mix.json").read_text()
    assert json.loads((tmp_path / "a" / "dataset_info.json").read_text()) == {
        "bench_mix": {"file_name": "bench_mix.json"}
    }
    mixed = json.loads(first)
    assert len(mixed) == 35 and mixed != rows + tb.long_rows(rows, 5)  # shuffled once
    long = [r for r in mixed if len(r["output"]) >= 6000]
    assert len(long) == 5 and meta["long_answer_chars"][1] < 24000 + 2000


def test_long_prompt_data_keeps_the_texts_and_answers_in_one_word(tmp_path: Path) -> None:
    src = tmp_path / "alpaca.json"
    rows = [
        {"instruction": f"Question {i}?", "input": "Context." if i % 2 else "", "output": f"Answer {i}. " * 9}
        for i in range(30)
    ]
    src.write_text(json.dumps(rows))
    meta = tb.write_bench_data(src, tmp_path / "a", n_long=5, long_prompts=True)
    tb.write_bench_data(src, tmp_path / "b", n_long=5)
    plain = json.loads((tmp_path / "b" / "bench_mix.json").read_text())
    heavy = json.loads((tmp_path / "a" / "bench_mix.json").read_text())
    assert meta["long_prompts"] is True and len(heavy) == len(plain) == 35
    for p, h in zip(plain, heavy):  # the same rows in the same order, the answer text moved into the prompt
        assert h["instruction"] == p["instruction"] and h["input"].endswith(p["output"])
        assert h["output"] == p["output"].split()[0] and " " not in h["output"]
    assert sum(len(r["output"]) for r in heavy) < sum(len(r["input"]) for r in heavy) / 20


@pytest.mark.slow
def test_cpu_smoke_runs_all_four_sides(tmp_path: Path) -> None:
    """~80 s on 2 cores: the tiny model through tunesmith's CLI and LLaMA-Factory's run_exp, 4 steps each."""
    if not LF_PYTHON.exists() or not ALPACA.exists():
        pytest.skip("needs bench/.venv-llamafactory (python bench/llamafactory_env.py) and ../shared")
    import train_throughput

    out = tmp_path / "r.json"
    rc = train_throughput.main(["--cpu-smoke", "--lf-python", str(LF_PYTHON), "--work", str(tmp_path / "w"),
                                "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert rc == 0, {k: r.get("output_tail", "")[-2000:] for k, r in res["runs"].items()}
    assert set(res["runs"]) == {f"qwen/lora/{s}" for s in tb.SIDES}
    for run in res["runs"].values():
        assert run["exit_code"] == 0 and run["steps_logged"] == 4 and run["steady"]["tokens_per_s"] > 0
        assert all(0 < loss < 20 for loss in run["losses"])
        assert 0 < run["first_step_s"] <= run["wall_s"]
    default = next(g for g in res["loss_guards"] if g["pair"] == "default")
    assert default["pass"] is True, default  # same documents, same weights: the same step-1 loss
    assert res["runs"]["qwen/lora/lf-best"]["config"]["neat_packing"] is True
    assert res["runs"]["qwen/lora/lf-default"]["info"]["versions"]["llamafactory"] == "0.9.5"


def test_budget_skips_and_merge_keeps_runs(tmp_path: Path) -> None:
    """Orchestration without training: a spent --budget-s records skips; --merge keeps finished runs."""
    if not ALPACA.exists():
        pytest.skip("needs ../shared (alpaca_en_demo.json)")
    import train_throughput

    base = ["--cpu-smoke", "--sides", "ts-default", "ts-best", "--work", str(tmp_path / "w")]
    out = tmp_path / "skipped.json"
    assert train_throughput.main([*base, "--budget-s", "0", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert {k: r.get("skipped") for k, r in res["runs"].items()} == {
        "qwen/lora/ts-default": "budget",
        "qwen/lora/ts-best": "budget",
    }
    assert res["archs"]["qwen"]["data_stats"]["rows"] == 64 + 8  # 64 alpaca rows + 8 long rows in the smoke
    assert res["settings"]["cutoff_len"] == 128 and res["definitions"]["mfu"].startswith("trained tokens/s")
    finished = {
        k: {"steady": {"tokens_per_s": 10.0, "tokens_per_step": 5.0}, "losses": [1.0]} for k in res["runs"]
    }
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": finished}))
    merged = tmp_path / "merged.json"
    assert train_throughput.main([*base, "--merge", str(earlier), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["runs"] == finished


def test_tunesmith_model_line_and_the_later_auto_checkpointing_decision_are_read():
    import train_throughput

    line = "[tunesmith] model: m | dtype bfloat16 | attention tunesmith_varlen | gradient checkpointing "
    assert train_throughput.ts_model_info(line + "on\n") == {
        "attn_implementation": "tunesmith_varlen",
        "gradient_checkpointing": True,
    }
    auto = (
        line
        + "auto (decided on the GPU)\n[tunesmith] gradient checkpointing off (auto): about 26.0 GiB without it "
        "at 16,384 tokens per micro-batch (0.10 MiB a token), of the GPU's 139.8 GiB\n"
    )
    assert train_throughput.ts_model_info(auto) == {
        "attn_implementation": "tunesmith_varlen",
        "gradient_checkpointing": False,
        "gradient_checkpointing_auto": True,
        "auto_estimate_gib": 26.0,
        "auto_estimate_tokens": 16384,
    }
    kernel = line + "on\n[tunesmith] flash_attn: varlen kernel: fa4 (flash-attn-4 4.0.0b36)\n"
    assert train_throughput.ts_model_info(kernel)["varlen_kernel"] == "fa4"
