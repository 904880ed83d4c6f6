"""Training callbacks (log, watchdog, plots) on a real tiny Trainer run on CPU, and the run manifest."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerState, TrainingArguments

from tunesmith.errors import TunesmithError
from tunesmith.plotting import plot_losses, smooth
from tunesmith.runs import finish_run_manifest, git_revision, package_versions, start_run_manifest
from tunesmith.train_callbacks import (
    PlotLossCallback,
    TrainCallbacks,
    count_trained_tokens,
    training_callbacks,
)
from tunesmith.train_log import TrainLogCallback, format_progress
from tunesmith.watchdog import LossWatchdog, diagnose

REPO = Path(__file__).resolve().parents[1]
SEQ, PROMPT, BATCH, STEPS = 16, 6, 4, 10
SUPERVISED_PER_SAMPLE = SEQ - PROMPT  # labels[1:] != -100 with the first PROMPT labels masked


def _data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (SEQ,), generator=g)
        labels = ids.clone()
        labels[:PROMPT] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class WatchedTrainer(Trainer):
    """The pattern a tunesmith stage follows: count tokens and check the loss in training_step."""

    def __init__(self, *args, cbs: TrainCallbacks, **kwargs):
        super().__init__(*args, callbacks=cbs.as_list(), **kwargs)
        self.cbs = cbs

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.cbs.log.add_tokens(count_trained_tokens(inputs["labels"]))
        self.cbs.watchdog.check(self.state.global_step + 1, loss, inputs)
        return loss


def _train(out: Path, cbs: TrainCallbacks, model=None, evaluate: bool = True, **overrides) -> WatchedTrainer:
    args = TrainingArguments(**dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        learning_rate=1e-3, logging_steps=1, eval_strategy="steps" if evaluate else "no", eval_steps=5,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    ) | overrides)  # fmt: skip
    trainer = WatchedTrainer(
        model=model or _model(),
        args=args,
        train_dataset=_data(BATCH * STEPS),
        eval_dataset=_data(8, seed=1),
        cbs=cbs,
    )
    trainer.train()
    return trainer


def test_tiny_run_writes_log_and_plots(tmp_path, caplog):
    total = BATCH * STEPS * SUPERVISED_PER_SAMPLE
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        _train(tmp_path, training_callbacks(plot_loss=True, total_tokens=total))
    lines = [json.loads(x) for x in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["loss"] is not None]
    evals = [r for r in lines if r["eval_loss"] is not None]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [5, 10]
    for r in train:
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["epoch"] > 0 and r["peak_mem_gib"] > 0
        assert r["tokens_seen"] == r["step"] * BATCH * SUPERVISED_PER_SAMPLE
        assert r["tokens_per_s"] > 0 and r["elapsed_s"] > 0 and r["remaining_s"] is not None
        assert r["total_steps"] == STEPS
    assert train[-1]["remaining_s"] == 0 and train[0]["remaining_s"] > 0
    assert [r["elapsed_s"] for r in train] == sorted(r["elapsed_s"] for r in train)
    assert "train_runtime" in lines[-1]  # HF's end-of-train summary is passed through
    progress = [m for m in caplog.messages if "tok/s" in m]
    assert len(progress) >= STEPS and any(
        re.search(r"^step 10/10 \(100%\).*\| loss .*left", m) for m in progress
    )
    assert "train_loss" in progress[-1]
    for name in ("training_loss.png", "training_eval_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_loss_off_and_skipped_curves(tmp_path):
    assert not any(isinstance(cb, PlotLossCallback) for cb in training_callbacks(plot_loss=False).as_list())
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 6, "loss": float("nan")}]
    assert plot_losses(history, tmp_path) == [tmp_path / "training_loss.png"]
    assert not (tmp_path / "training_eval_loss.png").exists()
    assert smooth([]) == [] and smooth([2.0]) == [2.0]
    values = [float(i % 2) for i in range(200)]
    assert max(smooth(values)[100:]) - min(smooth(values)[100:]) < 0.5  # smoothing damps the zig-zag


@pytest.mark.parametrize("logging_steps", [1, 4])
def test_watchdog_stops_nan_run_with_diagnosis_and_batch(logging_steps, tmp_path):
    model = _model()
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 3 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(TunesmithError) as err:
        _train(
            tmp_path,
            training_callbacks(plot_loss=False),
            model=model,
            evaluate=False,
            logging_steps=logging_steps,
        )
    text = str(err.value)
    assert "at step 3: loss is nan" in text  # the first bad step, also when it is read later
    went_on = "so training went on to step 4 before this check" in text
    assert went_on == (logging_steps == 4)  # losses are read at the log event of step 4
    assert "learning rate too high" in text and "tunesmith check" in text
    batch = torch.load(tmp_path / "watchdog_batch_step3.pt")
    assert batch["input_ids"].shape == (BATCH, SEQ) and str(tmp_path / "watchdog_batch_step3.pt") in text


def _watchdog(tmp_path: Path, **kwargs) -> LossWatchdog:
    dog = LossWatchdog(**kwargs)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=5e-5)
    dog.on_train_begin(args, TrainerState(), None)
    return dog


def test_watchdog_zero_loss_needs_consecutive_steps(tmp_path):
    dog = _watchdog(tmp_path, zero_patience=3)
    masked = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.full((2, 4), -100)}
    dog.check(1, torch.tensor(0.0), masked)
    dog.check(2, torch.tensor(0.0), masked)
    dog.check(2, torch.tensor(0.0), masked)  # a second micro-batch of step 2 (gradient accumulation)
    dog.check(3, torch.tensor(0.5), masked)  # a real loss resets the streak
    dog.check(4, torch.tensor(0.0), masked)
    dog.check(5, torch.tensor(0.0), masked)
    dog.check(6, torch.tensor(0.0), masked)  # queued: read at the next log event
    with pytest.raises(TunesmithError) as err:
        dog.on_log(None, TrainerState(global_step=6), None, logs={"loss": 0.1, "learning_rate": 0.1})
    text = str(err.value)
    assert "at step 6: loss is exactly 0.0 for 3 consecutive steps (4-6)" in text
    assert "every label of this batch is masked" in text and "0 supervised token(s)" in text
    assert torch.equal(torch.load(tmp_path / "watchdog_batch_step6.pt")["labels"], masked["labels"])


class _HostReads(TorchDispatchMode):
    """Counts host reads of a tensor's value (``.item()``, ``int()``, ``bool()``: a device sync on GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_bookkeeping_reads_nothing_per_micro_batch_and_reports_the_first_bad_one(tmp_path):
    dog = _watchdog(tmp_path, max_pending=8)
    cbs = TrainCallbacks(log=TrainLogCallback(), watchdog=dog, plot=None)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([[1, 2, 3, -100]] * 2)}
    losses = [1.0, 0.9, float("nan"), 0.8, float("inf"), 0.7, 0.6]
    with _HostReads() as mode:
        for step, loss in enumerate(losses, start=1):
            cbs.add_tokens(count_trained_tokens(batch["labels"]))
            dog.check(step, torch.tensor(loss), {**batch, "step": step})
    assert mode.reads == 0
    with pytest.raises(TunesmithError) as err:
        dog.check(8, torch.tensor(0.5), batch)  # the 8th queued loss: max_pending forces a read
    assert "at step 3: loss is nan" in str(err.value) and "went on to step 8" in str(err.value)
    assert torch.load(tmp_path / "watchdog_batch_step3.pt")["step"] == 3
    cbs.log.on_log(TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), None, logs={})
    assert cbs.log.tokens_seen == 7 * 4


def test_log_events_move_the_progress_bar(tmp_path):
    from tunesmith.progress import TokenProgressCallback

    cbs = training_callbacks(plot_loss=False, progress_bar=True)
    assert isinstance(cbs.progress, TokenProgressCallback) and cbs.log.progress is cbs.progress
    cbs.add_tokens(count_trained_tokens(torch.tensor([[1, 2, 3, -100]])))
    assert cbs.progress._pending == 0  # nothing read per micro-batch
    cbs.log.on_log(TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), None, logs={})
    assert cbs.progress._pending == 2


def test_watchdog_on_logged_loss_without_batch(tmp_path):
    dog = _watchdog(tmp_path)
    state = TrainerState(global_step=7)
    dog.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": 0.1})
    dog.on_log(None, state, None, logs={"eval_loss": float("nan")})  # eval logs are not watched
    with pytest.raises(TunesmithError, match="No batch was saved") as err:
        dog.on_log(None, state, None, logs={"loss": float("inf"), "learning_rate": 0.1})
    assert "step 7: logged loss is inf" in str(err.value) and "learning_rate 0.1" in str(err.value)
    assert not list(tmp_path.glob("*.pt"))


def test_diagnosis_mentions_fp16_only_when_used():
    assert "fp16 overflow" in diagnose("loss is nan", 3, nonfinite=True, fp16=True, lr=1e-4)
    assert "bf16" not in diagnose("loss is nan", 3, nonfinite=True, fp16=False, lr=1e-4)
    assert "fp16 underflow" in diagnose("loss is 0.0", 3, nonfinite=False, fp16=True, lr=1e-4)


def test_count_trained_tokens_ignores_first_position_and_masked():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, -100, -100]])
    count = count_trained_tokens(labels)
    assert isinstance(count, torch.Tensor) and count.device == labels.device and int(count) == 2


def test_eta_from_tokens_and_from_steps():
    state = TrainerState(global_step=5, max_steps=10, epoch=0.5)
    cb = TrainLogCallback(total_tokens=300)
    cb.tokens_seen = 100
    record = cb.record(state, {"loss": 2.0, "learning_rate": 1e-4}, elapsed=10.0)
    assert record["tokens_per_s"] == 10.0 and record["remaining_s"] == 20.0 and record["percent"] == 50.0
    no_tokens = TrainLogCallback().record(state, {"loss": 2.0}, elapsed=10.0)
    assert no_tokens["remaining_s"] == 10.0  # 5 steps took 10 s, 5 remain
    assert "step 5/10 (50%)" in format_progress(record) and "0:00:20 left" in format_progress(record)


def test_run_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"model": {"name": "tiny"}, "train": {"lr": 1e-4}}
    path = start_run_manifest(tmp_path / "out", config, {"alpaca_en_demo": "abc123"}, "tok456", seed=42)
    started = json.loads(path.read_text())
    assert path == tmp_path / "out" / "run.json" and started["status"] == "running"
    assert started["config"] == config and started["seed"] == 42 and started["tokenizer_hash"] == "tok456"
    assert started["data_hashes"] == {"alpaca_en_demo": "abc123"}
    assert {"torch", "transformers"} <= set(started["packages"])
    if (
        "tunesmith" in package_versions()
    ):  # run from a source tree on PYTHONPATH (the GPU machine): no version
        assert "tunesmith" in started["packages"]
    hw = started["hardware"]
    assert hw["cpu"] and hw["cpu_cores_logical"] >= 1 and hw["ram_gib"] > 0 and isinstance(hw["gpus"], list)
    assert "cuda" in hw and started["start_time"].endswith("+00:00") and started["end_time"] is None
    finish_run_manifest(path, {"train_loss": 1.5}, "completed")
    done = json.loads(path.read_text())
    assert done["status"] == "completed" and done["final_metrics"] == {"train_loss": 1.5}
    assert done["end_time"] >= done["start_time"] and done["config"] == config
    with pytest.raises(ValueError, match="status"):
        finish_run_manifest(path, {}, "done")  # type: ignore[arg-type]


def test_git_revision(tmp_path):
    assert git_revision(tmp_path) is None  # not a repository
    if (REPO / ".git").exists():
        rev = git_revision(REPO)
        assert (
            rev is not None
            and re.fullmatch(r"[0-9a-f]{40}", rev["commit"])
            and isinstance(rev["dirty"], bool)
        )


DISTRIBUTED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from transformers import TrainingArguments
from tests.test_train_callbacks import BATCH, WatchedTrainer, _data, _model
from tunesmith.train_callbacks import training_callbacks
args = TrainingArguments(output_dir=sys.argv[2], max_steps=3, per_device_train_batch_size=BATCH, logging_steps=1,
                         save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
WatchedTrainer(model=_model(), args=args, train_dataset=_data(BATCH * 6), cbs=training_callbacks(plot_loss=False)).train()
from tunesmith.training.distributed import end_process_group
end_process_group()  # as `tunesmith train` does: a live gloo group can abort a worker at exit
"""


def test_token_counts_are_summed_over_ranks(tmp_path):
    """Two CPU ranks under torchrun (gloo): the log's token count is the global one, written once."""
    from tunesmith.launcher import maybe_relaunch

    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_RUN)
    env = {
        k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")
    }
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    assert maybe_relaunch([str(script), str(REPO), str(tmp_path / "out")], env) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["loss"] is not None]
    assert [r["step"] for r in train] == [1, 2, 3]  # rank 0 only: no duplicate lines
    assert [r["tokens_seen"] for r in train] == [s * 2 * BATCH * SUPERVISED_PER_SAMPLE for s in (1, 2, 3)]


def test_watchdog_zero_logged_loss(tmp_path):
    dog = _watchdog(tmp_path, zero_patience=2)
    dog.on_log(None, TrainerState(global_step=1), None, logs={"loss": 0.0, "learning_rate": 0.1})
    with pytest.raises(TunesmithError, match="logged loss is exactly 0.0 for 2 consecutive logs"):
        dog.on_log(None, TrainerState(global_step=2), None, logs={"loss": 0.0, "learning_rate": 0.1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_a_gpu_is_max_memory_allocated():
    from tunesmith.train_log import peak_memory_gib

    device = torch.device("cuda")
    x = torch.empty(3 * 2**20, device=device)
    del x
    assert peak_memory_gib(device) == torch.cuda.max_memory_allocated(device) / 2**30 > 0
