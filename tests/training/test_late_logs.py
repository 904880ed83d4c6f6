"""Late log events (`training.late_logs`): read a step later, the same records, in the same order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tunesmith.training.late_logs import LateLogs

# what differs between two runs whatever the logging: times and memory
_TIMES = {"elapsed_s", "tokens_per_s", "remaining_s", "peak_mem_gib", "train_runtime",
          "train_samples_per_second", "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
          "eval_steps_per_second"}  # fmt: skip


class _Reads:
    """A participant: stages the given tensors, keeps what it is handed."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = list(tensors)
        self.taken: list[tuple[list[float], float]] = []

    def stage_reads(self) -> list[torch.Tensor]:
        return self.tensors

    def take_reads(self, values: list[float], at: float) -> None:
        self.taken.append((values, at))


def _stage(late: LateLogs, step: int, loss: float, norm: torch.Tensor | float | None) -> None:
    late.stage(step=step, epoch=step / 10, input_tokens=step * 100, steps=2, learning_rate=0.5 / step,
               loss_sum=torch.tensor(loss), grad_norm=norm)  # fmt: skip


def test_late_logs_deliver_oldest_first_keeping_the_newest_until_told():
    counts, losses = _Reads(torch.tensor(7), torch.tensor(9)), _Reads(torch.tensor(1.5))
    late = LateLogs([counts, losses], torch.device("cpu"))
    before = time.monotonic()
    _stage(late, 1, 3.0, torch.tensor(0.25))
    _stage(late, 2, 5.0, 0.75)  # DeepSpeed's float norm
    _stage(late, 3, 7.0, None)
    assert late.pending == 3 and counts.taken == []  # nothing read at staging
    first = list(late.deliver(keep_latest=True))
    assert [d.step for d in first] == [1, 2] and late.pending == 1
    d1, d2 = first
    assert d1.logs == {"loss": 1.5, "grad_norm": 0.25, "learning_rate": 0.5} and d1.loss_sum == 3.0
    assert d2.logs == {"loss": 2.5, "grad_norm": 0.75, "learning_rate": 0.25}
    assert (d1.epoch, d1.input_tokens) == (0.1, 100)
    assert [v for v, _ in counts.taken] == [[7.0, 9.0], [7.0, 9.0]]  # each participant its own slice
    assert [v for v, _ in losses.taken] == [[1.5], [1.5]]
    times = [at for _, at in counts.taken]
    assert before <= times[0] <= times[1] <= time.monotonic()
    (d3,) = late.deliver(keep_latest=False)
    assert d3.step == 3 and "grad_norm" not in d3.logs and late.pending == 0


def test_late_logs_refuse_devices_they_cannot_date():
    with pytest.raises(ValueError, match="CUDA device or the CPU"):
        LateLogs([], torch.device("meta"))


class _Spy(TrainerCallback):
    """When each training record reaches on_log: (its step, the steps ended by then)."""

    def __init__(self) -> None:
        self.ended = 0
        self.seen: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ended += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.seen.append((state.global_step, self.ended))


@pytest.fixture
def spies(monkeypatch) -> list[_Spy]:
    """Every trainer built in the test gets a `_Spy` of its own, listed here in build order."""
    import tunesmith.training.trainer as trainer_module

    made: list[_Spy] = []

    class Spied(trainer_module.TunesmithTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(_Spy())
            self.add_callback(made[-1])

    monkeypatch.setattr(trainer_module, "TunesmithTrainer", Spied)
    return made


def _records(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in _TIMES} for r in rows]


def _history(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [{k: v for k, v in r.items() if k not in _TIMES} for r in state["log_history"]]


def test_late_records_equal_read_at_once_with_eval_and_saves_in_order(
    tiny_model_dir, sft_data, tmp_path, spies
):
    """The run's records, log history and final metrics are those of reading at the logged step; each
    record but those of steps that evaluate, save or end the run reaches on_log one step later."""
    from tests.training.helpers import train

    common = dict(
        max_steps=7, val_size=0.25, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=5,
        max_grad_norm=0.5,
    )  # fmt: skip
    for name, deferred in (("late", True), ("now", False)):
        torch.manual_seed(0)
        train(tiny_model_dir, sft_data, tmp_path / name, deferred_logging=deferred, **common)
    late, now = spies
    assert now.seen == [(s, s) for s in range(1, 8)]  # read at the step
    # steps 3 and 6 (eval), 5 (save) and 7 (end) are read at once; the others when the next step has ended
    assert late.seen == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 5), (6, 6), (7, 7)]
    records = _records(tmp_path / "late")
    assert [r["step"] for r in records if r.get("loss") is not None] == list(range(1, 8))
    assert any(r.get("eval_loss") is not None for r in records)
    assert records == _records(tmp_path / "now")
    assert _history(tmp_path / "late") == _history(tmp_path / "now")
    saved = json.loads((tmp_path / "late" / "checkpoint-5" / "trainer_state.json").read_text())
    assert [r["step"] for r in saved["log_history"] if "loss" in r] == [1, 2, 3, 4, 5]  # saved after step 5's


def test_with_logging_steps_above_one_a_record_is_written_one_step_later(
    tiny_model_dir, sft_data, tmp_path, spies
):
    """logging_steps: 3: step 3's record reaches on_log when step 4 has ended, not at step 6's log event (a
    slow run's console would otherwise lag a whole logging interval)."""
    from tests.training.helpers import train

    train(tiny_model_dir, sft_data, tmp_path, max_steps=8, logging_steps=3)
    # steps 1 (the first step is logged), 3 and 6; each when the next step has ended (before the fix: the
    # next log event's, (1, 3), (3, 6), and step 6's at the end of the run)
    (spy,) = spies
    assert spy.seen == [(1, 2), (3, 4), (6, 7)]


def test_late_records_keep_the_elapsed_time_of_their_own_step(
    tiny_model_dir, sft_data, tmp_path, monkeypatch
):
    """A record read a step later is dated when its step ended, not when it was read: a step that takes
    0.3 s longer shows in its own record's elapsed time."""
    import tunesmith.training.trainer as trainer_module
    from tests.training.helpers import train

    class SlowStep4(trainer_module.TunesmithTrainer):
        def training_step(self, *args, **kwargs):
            if self.state.global_step == 3:  # step 4 is running
                time.sleep(0.3)
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "TunesmithTrainer", SlowStep4)
    train(tiny_model_dir, sft_data, tmp_path, max_steps=6)
    rows = [json.loads(x) for x in (tmp_path / "trainer_log.jsonl").read_text().splitlines() if x]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if r.get("loss") is not None}
    assert elapsed[4] - elapsed[3] >= 0.3  # read during step 5, yet dated at step 4's end
    assert elapsed[5] - elapsed[4] < 0.3


def test_watchdog_under_late_reads_names_the_bad_step(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run when the step-3 record is read (during step 4), naming step 3."""
    import tunesmith.training.trainer as trainer_module
    from tests.training.helpers import train
    from tunesmith.errors import TunesmithError

    class NanAtStep3(trainer_module.TunesmithTrainer):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(trainer_module, "TunesmithTrainer", NanAtStep3)
    with pytest.raises(TunesmithError, match="at step 3: loss is nan") as err:
        train(
            tiny_model_dir, sft_data, tmp_path, max_steps=8, cuda_graphs=False
        )  # a replay skips the override
    assert "went on to step 4" in str(err.value)
    assert (tmp_path / "watchdog_batch_step3.pt").exists()


def test_an_interrupted_run_still_writes_its_staged_record(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """Ctrl-C during step 4: step 3's record, staged but not yet read, is written before the run stops."""
    import tunesmith.training.trainer as trainer_module
    from tests.training.helpers import logged_losses, train

    class InterruptedAtStep4(trainer_module.TunesmithTrainer):
        def training_step(self, *args, **kwargs):
            if self.state.global_step == 3:
                assert self._late is not None and self._late.pending == 1  # step 3's, not read yet
                raise KeyboardInterrupt
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "TunesmithTrainer", InterruptedAtStep4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, sft_data, tmp_path, max_steps=8)
    assert [step for step, _ in logged_losses(tmp_path)] == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_late_logs_on_a_gpu_read_after_the_work_and_date_it():
    """On a GPU nothing is read at staging; the delivered time is when the staged work ended (after the
    queued matmuls, before the read), and the values are right."""
    a = torch.randn(4096, 4096, device="cuda")
    counts = _Reads(torch.tensor(3, device="cuda"), torch.tensor(5, device="cuda"))
    late = LateLogs([counts], torch.device("cuda"))
    torch.cuda.synchronize()
    start = time.monotonic()
    for _ in range(50):  # about 0.1 s of work queued
        a = (a @ a).clamp_(-1, 1)
    staged_at = time.monotonic()
    late.stage(step=1, epoch=None, input_tokens=0, steps=1, learning_rate=1.0,
               loss_sum=a.sum(), grad_norm=a.norm())  # fmt: skip
    assert time.monotonic() - staged_at < 0.05  # staging did not wait for the matmuls
    (d,) = late.deliver(keep_latest=False)
    read_at = time.monotonic()
    ((values, at),) = counts.taken
    assert values == [3.0, 5.0]
    assert d.logs["loss"] == pytest.approx(a.sum().item(), rel=1e-5)
    assert d.logs["grad_norm"] == pytest.approx(a.norm().item(), rel=1e-5)
    assert start < at <= read_at + 1e-3
