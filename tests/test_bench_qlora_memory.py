"""bench/qlora_memory.py: the context-length search (doubling, bisection, stops), time prediction, OOM
handling, log summary, goals; the --cpu-smoke run end to end; the context step on a 4-bit model."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import qlora_memory as qm  # noqa: E402


def _search(threshold: int, start: int = 2048, max_len: int = 131072, step: int = 1024, max_bisect: int = 4):
    """The lengths next_length picks when every L <= threshold fits."""
    tries: list[tuple[int, bool]] = []
    while (n := qm.next_length(tries, start, max_len, step, max_bisect)) is not None:
        assert n not in [t for t, _ in tries], "a length is never tried twice"
        tries.append((n, n <= threshold))
    return tries


def test_doubling_runs_to_the_max_when_everything_fits() -> None:
    assert [n for n, _ in _search(10**9)] == [2048 * 2**i for i in range(7)]  # 2048 .. 131072, then stop
    assert [n for n, _ in _search(10**9, max_len=5000)] == [2048, 4096, 5000]  # the cap itself is tried


def test_bisection_finds_the_longest_fit_to_the_step() -> None:
    tries = _search(10000)
    assert tries == [(2048, True), (4096, True), (8192, True), (16384, False), (12288, False), (10240, False),
                     (9216, True)]  # fmt: skip
    assert max(n for n, ok in tries if ok) == 9216 == 10000 // 1024 * 1024


@pytest.mark.parametrize("threshold", [3000, 20480, 50000, 70000, 100000, 131071])
def test_bisection_brackets_the_threshold(threshold: int) -> None:
    tries = _search(threshold, max_bisect=10)
    longest = max(n for n, ok in tries if ok)
    shortest_oom = min(n for n, ok in tries if not ok)
    assert longest <= threshold < shortest_oom
    assert longest == threshold // 1024 * 1024 or shortest_oom - longest <= 1024


def test_bisection_stops_after_max_bisect_tries() -> None:
    tries = _search(40000, max_bisect=2)
    assert tries[-3:] == [(65536, False), (49152, False), (40960, False)]
    assert max(n for n, ok in tries if ok) == 32768  # the bracket [32768, 40960) is left as measured


def test_a_first_length_that_does_not_fit_bisects_down_or_gives_up() -> None:
    assert _search(1500) == [(2048, False), (1024, True)]
    assert _search(500) == [(2048, False), (1024, False)]  # nothing fits; never tries 0


def test_predicted_seconds() -> None:
    assert qm.predict_seconds([], 4096) is None
    assert qm.predict_seconds([(2048, 1.0)], 4096) == pytest.approx(4.0)  # one point: quadratic
    assert qm.predict_seconds([(2048, 1.0), (4096, 2.0)], 8192) == pytest.approx(4.0)  # linear so far
    assert qm.predict_seconds([(2048, 1.0), (4096, 3.0)], 8192) == pytest.approx(9.0)  # L**1.58
    assert qm.predict_seconds([(2048, 1.0), (4096, 9.0)], 8192) == pytest.approx(36.0)  # capped at L**2
    assert qm.predict_seconds([(2048, 1.0), (4096, 1.0)], 8192) == pytest.approx(2.0)  # at least L**1


def _fake_measure(threshold: int, seconds: float = 0.0):
    def measure(n: int) -> dict:
        return {
            "len": n,
            "fit": n <= threshold,
            "seconds": seconds,
            "peak_gib": n / 1000 if n <= threshold else None,
        }

    return measure


def test_search_context_reports_every_try_and_the_longest_fit() -> None:
    seen: list[int] = []
    found = qm.search_context(_fake_measure(10000), 2048, 131072, 1024, 4, time.monotonic() + 60,
                              lambda tries: seen.append(len(tries)))  # fmt: skip
    assert seen == list(range(1, 8))  # results written after every try
    assert (found["longest_fit"], found["longest_fit_peak_gib"], found["shortest_oom"]) == (
        9216,
        9.216,
        10240,
    )
    assert found["stopped"] == "search complete"


def test_search_context_does_not_start_a_try_predicted_past_the_deadline() -> None:
    measure = _fake_measure(10**6, seconds=10.0)
    found = qm.search_context(measure, 2048, 131072, 1024, 4, time.monotonic() + 30, lambda tries: None)
    assert [t["len"] for t in found["tries"]] == [2048]  # 4096 would take ~40 s
    assert found["longest_fit"] == 2048 and found["stopped"].startswith("time limit: L=4096 predicted 40 s")


def test_out_of_memory_errors_are_recognised() -> None:
    import torch

    assert qm.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert qm.is_oom(
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    )
    assert not qm.is_oom(RuntimeError("expected mat1 and mat2 to have the same dtype"))


class _Raising:
    """A FusedHead stand-in whose loss raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def loss_sum(self, *args: object) -> None:
        raise self.error


def _linear_model():
    import torch

    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"vocab_size": 10})()
    model.weight.grad = torch.ones_like(model.weight)
    return model


def test_an_oom_is_a_recorded_misfit_and_other_errors_propagate() -> None:
    import torch

    model = _linear_model()
    record = qm.try_length(
        model, _Raising(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 9 GiB")), 64
    )
    assert record["fit"] is False and record["loss"] is None and "out of memory" in record["oom"]
    assert model.weight.grad is None  # freed for the next try
    with pytest.raises(RuntimeError, match="same dtype"):
        qm.try_length(model, _Raising(RuntimeError("expected both to have the same dtype")), 64)


def _log_row(step: int, tokens: int, elapsed: float, peak: float) -> dict:
    return {
        "step": step,
        "loss": 12.0 - step / 10,
        "tokens_seen": tokens,
        "elapsed_s": elapsed,
        "peak_mem_gib": peak,
    }


def test_train_log_summary_measures_the_steady_window() -> None:
    rows = [_log_row(s, 1000 * s, 0.5 + 2.0 * s, 5.0 + s / 10) for s in range(1, 11)]
    rows.append(
        {"step": 10, "loss": None, "train_loss": 11.5, "peak_mem_gib": 6.5}
    )  # the final summary record
    got = qm.summarize_train_log(rows, cuda=True)
    assert got["peak_mem_gib"] == 6.5 and got["peak_rss_gib"] is None
    assert (got["tokens_per_s"], got["tokens_per_step"], got["s_per_step"]) == (500.0, 1000.0, 2.0)
    assert got["window_steps"] == [3, 10] and got["steps"] == 10 and len(got["losses"]) == 10
    cpu = qm.summarize_train_log(rows, cuda=False)
    assert cpu["peak_mem_gib"] is None and cpu["peak_rss_gib"] == 6.5  # on CPU the log's peak is RSS
    assert "error" in qm.summarize_train_log([{"step": 0, "loss": None}], cuda=True)


@pytest.mark.parametrize(("peak", "verdict"), [(6.9, True), (7.0, True), (7.01, False), (None, None)])
def test_peak_goal(peak: float | None, verdict: bool | None) -> None:
    goal = qm.goals({"train": {"peak_mem_gib": peak}, "context": None})["qlora_2048_peak_le_7gib"]
    assert goal["pass"] is verdict and goal["value_gib"] == peak


def test_published_config_is_llama_3_1_8b() -> None:
    cfg = qm.model_config(smoke=False, vocab_size=0, bos=None, eos=None)
    expected = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "bos_token_id": 128000,
                "eos_token_id": [128001, 128008, 128009]}  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}  # fmt: skip
    assert cfg["rope_scaling"] == rope
    cfg["rope_scaling"]["factor"] = 0.0
    assert qm.LLAMA31_8B["rope_scaling"]["factor"] == 8.0  # a copy: transformers edits rope_scaling in place


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    """One --cpu-smoke run (tiny tokenizer, 40 synthetic alpaca rows, lengths 64..256, fake OOM above 200,
    MLPs tiled by 32 tokens)."""
    from tunesmith.tiny import tiny_tokenizer_dir

    tmp = tmp_path_factory.mktemp("qlora_memory")
    rows = [
        {"instruction": f"Item {i}.", "input": "", "output": "the sea is wide; " * (3 + i % 5)}
        for i in range(40)
    ]
    (tmp / "data.json").write_text(json.dumps(rows))
    out = tmp / "results" / "r.json"
    code = qm.main(["--cpu-smoke", "--tokenizer", str(tiny_tokenizer_dir()), "--template", "qwen", "--data",
                    str(tmp / "data.json"), "--work", str(tmp / "work"), "--out", str(out),
                    "--fake-oom-above", "200", "--tiled-mlp-tokens", "32"])  # fmt: skip
    return code, json.loads(out.read_text()), tmp / "work"


def test_cpu_smoke_trains_through_the_cli_and_searches_the_context(smoke: tuple[int, dict, Path]) -> None:
    code, res, work = smoke
    assert code == 0
    assert res["bench"] == "qlora_memory" and res["build"]["built"] is True
    assert res["model_config"]["num_hidden_layers"] == 2 and res["model_config"]["model_type"] == "llama"
    assert res["model_config"]["rope_parameters"]["rope_type"] == "llama3"
    train = res["train"]
    assert train["exit_code"] == 0 and train["steps"] == 3 and train["tokens_per_s"] > 0
    assert all(math.isfinite(x) for x in train["losses"])
    assert train["peak_mem_gib"] is None and train["peak_rss_gib"] > 0  # no CUDA allocator on CPU
    keys = res["settings"]["train"]
    assert keys["packing"] is True and keys["lora_target"] == "all" and keys["cutoff_len"] == 256
    assert (
        keys["tiled_mlp_tokens"] == 32 and res["settings"]["context"]["tiled_mlp_tokens"] == 32
    )  # both phases tile
    assert "quantization_bit" not in keys and "4-bit" in res["note"]  # CPU: 16-bit LoRA, said so
    ctx = res["context"]
    assert "error" not in ctx and ctx["load"]["gradient_checkpointing"] is True
    assert ctx["load"]["trainable_params"] > 0 and "q_proj" in ctx["load"]["lora_targets"]
    searched = [(t["len"], t["fit"]) for t in ctx["tries"]]
    assert searched == [(64, True), (128, True), (256, False), (192, True), (224, False)]
    vocab = res["model_config"]["vocab_size"]
    for t in ctx["tries"]:
        if t["fit"]:  # random tokens on a random model: the loss is about ln(vocab)
            assert t["peak_gib"] is None and abs(t["loss"] - math.log(vocab)) < 0.5
    assert (ctx["longest_fit"], ctx["shortest_oom"], ctx["stopped"]) == (192, 224, "search complete")
    assert res["goals"]["qlora_2048_peak_le_7gib"]["pass"] is None
    assert res["goals"]["longest_trainable_context"]["value"] == 192


def test_a_second_run_reuses_the_built_model(smoke: tuple[int, dict, Path]) -> None:
    _, res, work = smoke
    again = qm.build_model(work / "llama-smoke", Path("/nonexistent"), smoke=True)  # no tokenizer needed
    assert again["built"] is False and again["config"] == res["model_config"]


def test_the_context_step_trains_lora_on_a_4bit_model(smoke: tuple[int, dict, Path]) -> None:
    """What the GPU run does, on bitsandbytes' CPU backend: tunesmith's loader is CUDA-only for 4-bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.model.loader import bnb_config, enable_gradient_checkpointing
    from tunesmith.model.tuning import TuningOptions, apply_tuning
    from tunesmith.training.fused_head import probe_fused_head

    _, res, work = smoke
    quantized = {
        "dtype": torch.bfloat16,
        "device_map": {"": "cpu"},
        "quantization_config": bnb_config(4, torch.bfloat16),
    }
    base = AutoModelForCausalLM.from_pretrained(work / "llama-smoke", **quantized)
    enable_gradient_checkpointing(base)
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model = apply_tuning(base, TuningOptions(lora_rank=8), quantized=True).model
    # bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a 4-bit weight for its CPU inference kernel at
    # the first eval-mode forward without gradients (the fused head's probe is one), and from then on its
    # 4-bit matmul passes no gradient to its input: every LoRA layer before a 4-bit one got a zero gradient
    # (seen on such a CI machine). The GPU run this stands for never repacks; neither does this CPU stand-in.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model.train()
    ids = torch.arange(16)[None] + 100
    fused = probe_fused_head(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not isinstance(fused, str), fused
    loss = qm._forward_backward(model, fused, torch.randint(0, 2000, (1, 96)), None)
    assert abs(loss - math.log(res["model_config"]["vocab_size"])) < 0.5
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # every adapter got a gradient
    record = qm.try_length(model, fused, 128)
    assert record["fit"] and record["len"] == 128 and math.isfinite(record["loss"])
    assert all(p.grad is None for p in model.parameters())  # freed between tries
