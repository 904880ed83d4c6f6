"""Whole-step CUDA graphs (training.step_graphs): static batch shapes, and replays that train exactly as eager
steps. CUDA graphs need a GPU; here an eager stand-in records the step at capture and reruns it at each
replay, so everything around the graph (the input buffers, gradient accumulation across micro-batches and
windows, the warm-up, falling back) is checked on the CPU. The capture itself runs on the GPU in
bench/train_throughput.py (the default pair) and bench/cuda_graph_step.py."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

import tunesmith.training.trainer as trainer_module
from tests.training.helpers import LogMessages, load_safetensors, logged_losses, train
from tunesmith.data.collate import (
    IGNORE_INDEX,
    LOSS_ROW_WEIGHTS,
    LOSS_ROWS,
    STATIC_FLOORS,
    CausalLMCollator,
    grid_size,
    likely_widths,
    static_loss_size,
    static_width,
    trained_fraction,
    width_rows,
)
from tunesmith.training.step_graphs import StepGraphs, shape_key


class EagerCapturer:
    """A capture records the step without running it (as CUDA's does); a replay runs it again."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captures = 0
        self.warm_ups = 0
        self.replays = 0
        self.events: list[str] = []  # "capture" and "replay N" (of the N-th capture's graph), in order

    def warm_up(self, fn):
        self.warm_ups += 1
        fn()

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.events.append("capture")
        index = self.captures

        def replay():
            self.replays += 1
            self.events.append(f"replay {index}")
            fn()

        return replay


def test_grid_sizes_bound_the_padding_and_the_number_of_shapes():
    seen = set()
    for n in range(1, 20000):
        size = grid_size(n, 256)
        assert size >= n and (n <= 256 or size - n < n / 4)
        seen.add(size)
    # 256 and 4 sizes in each of the 6 doublings up to 16384, then 1 of the next (20000 <= 20480)
    assert len(seen) == 1 + 4 * 6 + 1
    assert [grid_size(n, 256) for n in (1399, 2048, 2049)] == [1536, 2048, 2560]
    assert [grid_size(n, 256, steps_per_octave=8) for n in (1399, 2048, 2049)] == [1408, 2048, 2304]


def _rows(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 50) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    return out


def test_static_batches_are_the_plain_ones_padded_on_the_grid():
    rows = _rows([17, 30, 5, 90, 41])
    plain = CausalLMCollator(0, 8, boundaries=True)(rows)
    static = CausalLMCollator(0, 8, boundaries=True, static_shapes=True)(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    width = static["input_ids"].shape[1]
    assert width == grid_size(total, STATIC_FLOORS["tokens"]) and width % 8 == 0
    n = plain["input_ids"].shape[1]
    for key in ("input_ids", "labels", "position_ids"):  # the plain batch, then padding
        assert static[key][:, :n].tolist() == plain[key].tolist()
    assert (static["labels"][:, n:] == IGNORE_INDEX).all()  # no padding token is trained or counted
    cu = static["cu_seq_lens_q"].tolist()
    docs = len(plain["cu_seq_lens_q"]) - 1  # the rows and the collator's own padding document
    assert len(cu) - 1 == grid_size(docs, STATIC_FLOORS["documents"])
    assert cu[:docs] == plain["cu_seq_lens_q"].tolist()[:-1]  # the same documents start at the same tokens
    assert all(b == width for b in cu[docs:])  # the padding document grows to the width, then empty ones
    assert static["max_length_q"] == width
    real = plain[LOSS_ROWS]
    rows_out, weights = static[LOSS_ROWS], static[LOSS_ROW_WEIGHTS]
    assert len(rows_out) == width == len(weights)  # one size per width: the batch's shape is its width
    assert rows_out[: len(real)].tolist() == real.tolist()
    assert (rows_out[len(real) :] == real[0]).all()  # copies of a real row: a valid target, weight 0
    assert weights.tolist() == [1.0] * len(real) + [0.0] * (len(weights) - len(real))


def test_a_static_batch_shape_is_its_width_alone():
    """Batches of one grid width share one graph whatever their documents and trained tokens: the loss rows
    follow the width (a grid of their own multiplied the shapes of a run, 21 captures in 51 steps)."""
    a = _rows([300, 500])  # 800 tokens, 533 trained
    b = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in _rows([100, 200, 150, 360])]  # 810
    collate = CausalLMCollator(0, 8, boundaries=True, static_shapes=True)
    ka, kb = (shape_key(collate(x), 1) for x in (a, b))
    assert collate(a)[LOSS_ROWS].numel() == collate(b)[LOSS_ROWS].numel() == 896 == grid_size(800, 256)
    assert ka == kb
    assert shape_key(collate(_rows([900])), 1) != ka  # past the grid step (896): the next shape, 1024


def test_a_batch_without_targets_gets_no_padding_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}]
    batch = CausalLMCollator(0, 1, boundaries=True, static_shapes=True)(rows)
    assert batch[LOSS_ROWS].numel() == 0 and LOSS_ROW_WEIGHTS not in batch  # such a batch runs eagerly


def _twin_linears():
    """Two Linear(3, 2) with the same weights (the second loads the first's), seeded."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    return first, second


def _linear_step(model, sync: bool = False):
    def step(inputs, num_items):
        loss = ((model(inputs["x"]) - inputs["y"]) ** 2).sum() / num_items
        if sync:
            float(loss)  # a host read: cannot be captured
        loss.backward()
        return loss.detach()

    return step


def _batch(seed, rows=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 3, generator=g).to(device),
        "y": torch.randn(rows, 2, generator=g).to(device),
    }


def _accumulation_matches_eager(capturer, device="cpu"):
    torch.manual_seed(0)
    eager, graphed = torch.nn.Linear(3, 2).to(device), torch.nn.Linear(3, 2).to(device)
    graphed.load_state_dict(eager.state_dict())
    graphs = StepGraphs(list(graphed.parameters()), capturer)
    step = _linear_step(graphed)
    for window in range(3):  # windows of 2 micro-batches; shapes 4, 6, 4, 6, 4, 6 rows
        for micro in range(2):
            batch, n = _batch(10 * window + micro, 4 + 2 * micro, device), torch.tensor(7.0, device=device)
            expected = _linear_step(eager)(batch, n)
            got = graphs.step(step, batch, n)
            torch.testing.assert_close(got, expected)
        for a, b in zip(eager.parameters(), graphed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)
        eager.zero_grad(set_to_none=True)
        graphed.zero_grad(set_to_none=True)  # as HF's optimizer step does: the next replay starts at zero
    assert graphs.off is None and len(graphs.graphs) == 2 and graphs.replays == 6
    return graphs


class WarmUpFailsLate(EagerCapturer):
    """The second warm-up runs the step (its gradients land in the accumulators), then fails."""

    def warm_up(self, fn):
        super().warm_up(fn)
        if self.warm_ups == 2:
            raise RuntimeError("out of memory in the warm-up")


def test_a_warm_up_that_fails_after_its_backward_leaves_the_window_gradients_as_they_were():
    eager, graphed = _twin_linears()
    graphs = StepGraphs(list(graphed.parameters()), WarmUpFailsLate(), warm_up_every_shape=True)
    step = _linear_step(graphed)
    for micro, rows in enumerate((4, 6)):  # one window: a replayed micro-batch, then a new shape that fails
        batch, n = _batch(micro, rows), torch.tensor(7.0)
        torch.testing.assert_close(graphs.step(step, batch, n), _linear_step(eager)(batch, n))
    assert graphs.off is not None and "out of memory in the warm-up" in graphs.off
    for a, b in zip(eager.parameters(), graphed.parameters()):  # the warm-up's gradients were taken out
        torch.testing.assert_close(b.grad, a.grad)


def test_prepare_captures_without_training_and_a_later_step_replays_it():
    eager, graphed = _twin_linears()
    capturer = EagerCapturer()
    graphs = StepGraphs(list(graphed.parameters()), capturer)
    step = _linear_step(graphed)
    assert graphs.prepare(step, _batch(9, 6), torch.tensor(7.0))  # a width ahead: captured, not run
    assert capturer.captures == 1 and capturer.replays == 0
    assert all(p.grad is None for p in graphed.parameters())  # the warm-up's gradients were taken out
    for micro, rows in enumerate((4, 6)):
        batch, n = _batch(micro, rows), torch.tensor(7.0)
        torch.testing.assert_close(graphs.step(step, batch, n), _linear_step(eager)(batch, n))
    assert capturer.captures == 2 and capturer.events[-1] == "replay 1"  # the 6-row batch: no new capture
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    off = StepGraphs(list(graphed.parameters()), EagerCapturer(fail=True))
    assert not off.prepare(step, _batch(1, 4), torch.tensor(7.0)) and off.off is not None


def test_replays_accumulate_like_eager_steps_across_windows():
    capturer = EagerCapturer()
    _accumulation_matches_eager(capturer)
    assert capturer.captures == 2 and capturer.warm_ups == 1  # two shapes; the stream warmed up once
    assert capturer.replays == 6


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@gpu
def test_cuda_replays_accumulate_like_eager_steps_across_windows():
    from tunesmith.training.step_graphs import CudaCapturer, training_stream

    with training_stream():
        _accumulation_matches_eager(CudaCapturer(), "cuda")
    with pytest.raises(RuntimeError, match="captured on a side stream"):  # never on the default stream
        CudaCapturer().capture(lambda: None)


@gpu
def test_a_host_read_under_capture_turns_cuda_graphs_off_and_the_step_runs_eagerly():
    from tunesmith.training.step_graphs import CudaCapturer, training_stream

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).cuda()
    reference = torch.nn.Linear(3, 2).cuda()
    reference.load_state_dict(model.state_dict())
    with training_stream():
        stream = torch.cuda.current_stream()
        graphs = StepGraphs(list(model.parameters()), CudaCapturer())
        for seed in (1, 2):
            batch = _batch(seed, device="cuda")
            loss = graphs.step(_linear_step(model, sync=True), batch, 2.0)
            torch.testing.assert_close(loss, _linear_step(reference)(batch, 2.0))
        assert graphs.off is not None and "capturing" in graphs.off and not graphs.graphs
        torch.testing.assert_close(model.weight.grad, reference.weight.grad)
        assert torch.cuda.current_stream() == stream  # still the training's stream
        torch.cuda.synchronize()  # and CUDA works on
        # random draws too: a failed capture left the CUDA generator capturing, and every later draw (a
        # dropout, the varlen probe of the next run in this process) raised "Offset increment outside graph
        # capture encountered unexpectedly" (seen on an H200, torch 2.11)
        before = torch.cuda.get_rng_state()
        torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
        assert not torch.equal(torch.cuda.get_rng_state(), before)


def test_a_replay_reads_the_new_batch_and_the_warm_up_leaves_no_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    graphs = StepGraphs(list(model.parameters()), EagerCapturer(), warm_up_every_shape=True)
    step = _linear_step(model)
    first, second = _batch(1), _batch(2)
    graphs.step(step, first, 1.0)
    model.zero_grad(set_to_none=True)
    loss = graphs.step(step, second, 1.0)  # same shape: replayed with the second batch's values
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    assert torch.allclose(loss, _linear_step(reference)(second, 1.0))
    assert torch.allclose(model.weight.grad, reference.weight.grad)  # once, not plus the warm-up's


def test_eager_micro_batches_mix_with_replays_in_one_window():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    graphs = StepGraphs(list(model.parameters()), EagerCapturer(), max_graphs=1)
    step = _linear_step(model)
    batches = [_batch(1), _batch(2, rows=5), _batch(3)]  # the 5-row shape is past max_graphs: eager
    for b in batches:
        graphs.step(step, b, 3.0)
        _linear_step(reference)(b, 3.0)
    assert len(graphs.graphs) == 1 and graphs.replays == 2
    assert torch.allclose(model.weight.grad, reference.weight.grad, atol=1e-6)


def test_shape_keys_tell_shapes_values_and_the_count_kind_apart():
    a = {"x": torch.zeros(2, 3), "max_length_q": 256}
    assert shape_key(a, 1) == shape_key({"x": torch.ones(2, 3), "max_length_q": 256}, 5)
    assert shape_key(a, 1) != shape_key({"x": torch.zeros(2, 4), "max_length_q": 256}, 1)
    assert shape_key(a, 1) != shape_key({"x": torch.zeros(2, 3), "max_length_q": 512}, 1)
    assert shape_key(a, 1) != shape_key(a, None)
    assert shape_key(a, 1, (2,)) != shape_key(a, 1, (1,))


def _graphed_training(monkeypatch, capturer, **overrides):
    monkeypatch.setattr(trainer_module, "graph_obstacles", lambda trainer, model: [])
    monkeypatch.setattr(trainer_module, "CudaCapturer", lambda: capturer)
    return overrides


@pytest.mark.parametrize(
    ("method", "accumulation"), [("lora", 2), ("full", 1)], ids=["lora-accumulation-2", "full"]
)
def test_graphed_training_trains_exactly_as_eager(method, accumulation, tiny_model_dir, sft_data, tmp_path, monkeypatch):  # fmt: skip
    """The same losses and weights as the eager run; the batches were static and the steps replayed."""
    common = dict(
        finetuning_type=method,
        flash_attn="varlen",
        max_steps=4,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=accumulation,
    )
    torch.manual_seed(0)
    train(tiny_model_dir, sft_data, tmp_path / "eager", cuda_graphs=False, **common)
    capturer = EagerCapturer()
    with monkeypatch.context() as m:
        _graphed_training(m, capturer)
        torch.manual_seed(0)
        train(tiny_model_dir, sft_data, tmp_path / "graphs", **common)
    micro_batches = 4 * accumulation
    assert capturer.captures >= 1 and capturer.replays == micro_batches - 1  # all but the first
    eager, graphs = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "graphs")
    assert [s for s, _ in eager] == [s for s, _ in graphs] == [1, 2, 3, 4]
    assert [x for _, x in graphs] == pytest.approx([x for _, x in eager], rel=1e-4)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_safetensors(tmp_path / "eager" / name), load_safetensors(tmp_path / "graphs" / name)
    for key, w in a.items():
        torch.testing.assert_close(b[key], w, rtol=1e-4, atol=1e-5, msg=key)
    tokens = [
        json.loads(x) for x in (tmp_path / "graphs" / "trainer_log.jsonl").read_text().splitlines() if x
    ]
    eager_tokens = [
        json.loads(x) for x in (tmp_path / "eager" / "trainer_log.jsonl").read_text().splitlines() if x
    ]
    seen = [r["tokens_seen"] for r in tokens if "tokens_seen" in r]
    assert seen and seen == [
        r["tokens_seen"] for r in eager_tokens if "tokens_seen" in r
    ]  # padding not counted


def _eager_then_graphed(model, data, tmp_path, capturer, monkeypatch, **overrides) -> list[str]:
    """Train eagerly into tmp_path/eager, then with graphs replayed by ``capturer`` into tmp_path/graphs
    (varlen, same seed); the graphed run's tunesmith log messages."""
    torch.manual_seed(0)
    train(model, data, tmp_path / "eager", cuda_graphs=False, flash_attn="varlen", **overrides)
    log = LogMessages()
    logging.getLogger("tunesmith").addHandler(log)
    try:
        with monkeypatch.context() as m:
            _graphed_training(m, capturer)
            torch.manual_seed(0)
            train(model, data, tmp_path / "graphs", flash_attn="varlen", **overrides)
    finally:
        logging.getLogger("tunesmith").removeHandler(log)
    return log.messages


def _long_rows_data(path, rows=24, long_prompts=False):
    """Rows of 10 to 400 words: batches of 3 rows take several static widths (256 to about 1,500); with
    ``long_prompts`` the words are in the prompt and the answer is one word (a small trained share)."""
    rng = random.Random(1)
    data = []
    for i in range(rows):
        words = " ".join(["word"] * rng.randrange(10, 400))
        prompt, answer = (words, f"{i}") if long_prompts else (f"Repeat the word {i}.", words)
        data.append({"instruction": prompt, "input": "", "output": answer})
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("long_prompts", [False, True], ids=["long-answers", "long-prompts"])
def test_likely_widths_are_captured_ahead_and_training_is_unchanged(long_prompts, tiny_model_dir, tmp_path, monkeypatch):  # fmt: skip
    """At the first replayed step the widths random batches of this data take are captured (made of one
    token, never trained on): later batches of those widths replay with no capture of their own, and the
    run trains exactly as the eager one. With long prompts the loss rows are padded to the data's trained
    share of the width, not to the width."""
    import tunesmith.data.collate as collate_module

    data = _long_rows_data(tmp_path / "long.json", long_prompts=long_prompts)
    fractions = []
    real = collate_module.trained_fraction
    monkeypatch.setattr(
        collate_module, "trained_fraction", lambda *a, **k: fractions.append(real(*a, **k)) or fractions[-1]
    )
    capturer = EagerCapturer()
    common = dict(max_steps=12, per_device_train_batch_size=3, cutoff_len=512)
    messages = _eager_then_graphed(tiny_model_dir, data, tmp_path, capturer, monkeypatch, **common)
    ahead = [x for x in messages if "captured ahead" in x]
    assert len(ahead) == 1, messages
    n_ahead = int(ahead[0].split()[2])
    assert n_ahead >= 1
    assert capturer.replays == 11  # every step but the first
    first = next(i for i, e in enumerate(capturer.events) if e.startswith("replay"))
    assert capturer.events[:first] == ["capture"] * (n_ahead + 1)  # those ahead, then the batch's own
    ahead = {f"replay {i}" for i in range(1, n_ahead + 1)}
    assert sum(e in ahead for e in capturer.events) >= 3  # later batches replayed graphs captured ahead
    assert capturer.captures <= n_ahead + 1 + 2  # at most two rarer widths captured when they came
    assert len(fractions) == 1 and (fractions[0] < 0.25 if long_prompts else fractions[0] > 0.5)
    eager, graphs = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "graphs")
    assert [x for _, x in graphs] == pytest.approx([x for _, x in eager], rel=1e-4)
    a = load_safetensors(tmp_path / "eager" / "adapter_model.safetensors")
    b = load_safetensors(tmp_path / "graphs" / "adapter_model.safetensors")
    for key, w in a.items():
        torch.testing.assert_close(b[key], w, rtol=1e-4, atol=1e-5, msg=key)


def test_loss_rows_follow_the_trained_share_of_the_width():
    rows = _rows([300, 410, 250])  # 960 tokens -> 1024 wide, about 2/3 trained
    wide = CausalLMCollator(0, 8, boundaries=True, static_shapes=True)(rows)
    assert wide[LOSS_ROWS].numel() == 1024  # fraction 1.0: the width
    narrow = CausalLMCollator(0, 8, boundaries=True, static_shapes=True, loss_rows_fraction=0.7)(rows)
    n = len(wide[LOSS_ROWS]) - int((wide[LOSS_ROW_WEIGHTS] == 0).sum())
    assert narrow[LOSS_ROWS].numel() == static_loss_size(1024, 0.7) == 768 >= n
    assert narrow[LOSS_ROWS][:n].tolist() == wide[LOSS_ROWS][:n].tolist()
    assert narrow[LOSS_ROW_WEIGHTS].sum() == n
    over = CausalLMCollator(0, 8, boundaries=True, static_shapes=True, loss_rows_fraction=0.3)(rows)
    assert over[LOSS_ROWS].numel() == over[LOSS_ROW_WEIGHTS].numel() == 1024  # over the share: the width
    assert static_loss_size(300, 0.01) == 64 and static_loss_size(4096, 1.0) == 4096


def test_trained_fraction_is_the_largest_trained_share_of_a_batch_width():
    lengths = np.full(200, 100)
    trained = np.full(200, 5)
    trained[0] = 99  # one row all answer: a batch holding it trains (99 + 3 x 5) of 448 (400 on the grid)
    asked = []

    def trained_of(rows):
        asked.append(rows)
        return trained[rows]

    assert trained_fraction(lengths, trained_of, 4, 8) == pytest.approx(
        114 / 448
    )  # the largest, not the mean
    assert len(asked) == 1 and len(set(asked[0].tolist())) == len(asked[0]) <= 200  # drawn rows, each once
    assert trained_fraction(lengths, lambda rows: lengths[rows], 4, 8) <= 1.0
    assert trained_fraction(np.array([], dtype=np.int64), trained_of, 4) == 1.0


def test_likely_widths_keep_those_expected_in_the_run():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(40, 300, 900), np.full(100, 2048)])
    every, short = likely_widths(lengths, 8, 8), likely_widths(lengths, 8, 8, batches=20)
    assert set(short) < set(every) and short  # a 20-step run: only the widths of at least 1 in 20 batches


def test_likely_widths_cover_the_batches_of_the_data():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(40, 300, 900), np.full(100, 2048)])
    widths = likely_widths(lengths, 8, 8)
    assert all(w % 8 == 0 for w in widths)
    assert all(static_width(w - 1, 8) == w for w in widths)  # grid sizes
    batches = [static_width(int(lengths[rng.integers(0, 1000, 8)].sum()), 8) for _ in range(500)]
    covered = sum(w in widths for w in batches) / len(batches)
    assert covered > 0.99
    few = likely_widths(lengths, 8, 8, limit=3)
    assert len(few) == 3 and set(few) <= set(widths)
    assert sum(w in few for w in batches) > 0.4 * len(batches)  # the most frequent three
    assert likely_widths(np.array([], dtype=np.int64), 8) == []


@pytest.mark.parametrize("weights", [False, True])
def test_width_rows_make_a_batch_of_that_width_with_a_padding_document(weights):
    collate = CausalLMCollator(0, 8, boundaries=True, static_shapes=True)
    real = collate(_rows([300, 410, 250]))  # 960 tokens -> 1024, a padding document
    made = collate(width_rows(1024, 3, 7, weights))
    assert made["input_ids"].shape == real["input_ids"].shape == (1, 1024)
    assert shape_key({k: v for k, v in made.items() if k != "loss_weights"}, 1) == shape_key(real, 1)
    assert ("loss_weights" in made) is weights
    assert made["cu_seq_lens_q"].tolist()[:5] == [0, 341, 682, 1023, 1024]  # 3 rows, then 1 padding token
    # with the loss rows at a share of the width, the made batch still has a real batch's shape
    share = CausalLMCollator(0, 8, boundaries=True, static_shapes=True, loss_rows_fraction=0.7)
    real, made = share(_rows([300, 410, 250])), share(width_rows(1024, 3, 7, weights))
    assert made[LOSS_ROWS].shape == real[LOSS_ROWS].shape == (static_loss_size(1024, 0.7),)


def test_a_failed_capture_turns_graphs_off_and_training_goes_on(
    tiny_model_dir, sft_data, tmp_path, monkeypatch
):
    capturer = EagerCapturer(fail=True)
    common = dict(max_steps=3, per_device_train_batch_size=3)
    messages = _eager_then_graphed(tiny_model_dir, sft_data, tmp_path, capturer, monkeypatch, **common)
    off = [x for x in messages if x.startswith("cuda graphs: off for the rest of the run")]
    assert len(off) == 1 and "operation not permitted when stream is capturing" in off[0]
    assert capturer.replays == 0
    eager, graphs = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "graphs")
    assert [x for _, x in graphs] == pytest.approx([x for _, x in eager], rel=1e-4)


def test_cuda_graphs_true_is_refused_when_the_config_rules_graphs_out(tiny_model_dir, sft_data, tmp_path):
    from tests.training.helpers import run_config
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    cfg = run_config(
        tiny_model_dir, sft_data, tmp_path / "on", flash_attn="sdpa", fp16=True, cuda_graphs=True
    )
    with pytest.raises(TunesmithError, match="cuda_graphs") as e:
        load_config(None, cfg)
    assert "flash_attn: sdpa" in str(e.value) and "fp16" in str(e.value)
    assert not (tmp_path / "on").exists()  # refused before anything ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a CUDA GPU")
def test_cuda_graphs_true_without_a_gpu_fails_before_the_first_step(tiny_model_dir, sft_data, tmp_path):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match=r"cuda_graphs: true, but .*no CUDA GPU.*Fix: "):
        train(tiny_model_dir, sft_data, tmp_path / "on", flash_attn="varlen", max_steps=2, cuda_graphs=True)
    assert not (tmp_path / "on").exists()  # before the data or the model were loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a CUDA GPU")
def test_a_cpu_varlen_lora_run_lacks_only_the_gpu(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """The run graphs would take on a GPU: the trainer's own checks find nothing else against them."""
    found = []
    real = trainer_module.graph_obstacles

    def recording(trainer, model):
        found.append(real(trainer, model))
        return found[-1]

    monkeypatch.setattr(trainer_module, "graph_obstacles", recording)
    train(tiny_model_dir, sft_data, tmp_path / "out", flash_attn="varlen", max_steps=2)
    assert found and all(set(f) == {"cuda_graphs: false", "no CUDA GPU"} for f in found), found


def test_a_replay_finds_the_model_in_training_mode_after_an_evaluation(tiny_model_dir, sft_data, tmp_path, monkeypatch):  # fmt: skip
    """A replay runs none of HF's Python, so the trainer puts the model back in train mode itself."""
    modes = []

    class Recording:
        """Runs each step as it comes, noting the model's mode first."""

        def __init__(self, *args, **kwargs):
            """StepGraphs' arguments, unused."""

        def step(self, fn, inputs, num_items, extra=()):
            modes.append(fn.args[0].training)  # the model, as a replay would find it
            return fn(inputs, num_items)

    with monkeypatch.context() as m:
        _graphed_training(m, EagerCapturer())
        m.setattr(trainer_module, "StepGraphs", Recording)
        train(tiny_model_dir, sft_data, tmp_path / "out", flash_attn="varlen", max_steps=3, val_size=0.25,
              eval_strategy="steps", eval_steps=1, per_device_train_batch_size=3)  # fmt: skip
    assert len(modes) == 2 and all(modes)  # steps 2 and 3, each after an evaluation


def test_config_obstacles_name_each_feature_that_rules_graphs_out():
    from tunesmith.config import load_config
    from tunesmith.config_checks import cuda_graph_obstacles

    def obstacles(**keys):
        cfg = load_config(None, {"model_name_or_path": "m", "stage": "sft", **keys})
        return cuda_graph_obstacles(cfg.to_flat_dict(), cfg.training.hf)

    assert obstacles() == []  # the defaults allow graphs
    assert obstacles(stage="dpo") == ["stage dpo (graphs replay pt and sft steps)"]
    for keys, word in [
        ({"cuda_graphs": False}, "cuda_graphs: false"),
        ({"flash_attn": "sdpa"}, "flash_attn: sdpa"),
        ({"quantization_bit": 4}, "quantization_bit"),
        ({"disable_gradient_checkpointing": False}, "gradient checkpointing"),
        ({"tiled_mlp_tokens": 1024}, "tiled_mlp_tokens"),
        ({"optim": "adalomo"}, "optim adalomo"),
        ({"optim": "galore_adamw_layerwise"}, "optim galore_adamw_layerwise"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"finetuning_type": "full"}, "finetuning_type: full"),  # unset: LoRA and freeze only, as measured
        ({"packing": True}, "packing (measured slower"),  # unset: unpacked batches only, as measured
        ({"neat_packing": True}, "packing (measured slower"),
        ({"stage": "pt"}, "packing (measured slower"),  # pt packs by default
    ]:
        found = obstacles(**keys)
        assert len(found) == 1 and found[0].startswith(word), (keys, found)


def test_the_stage_decides_from_the_config_and_the_launch(monkeypatch):
    """With a GPU: graphs left to the trainer unless the config or a multi-process launch rules them out
    (logged, or with cuda_graphs: true an error); cuda_graphs: true turns them on for full fine-tuning."""
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.training import causal_lm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def decide(**keys):
        return causal_lm._cuda_graphs(load_config(None, {"model_name_or_path": "m", "stage": "sft", **keys}))

    assert decide() == (None, []) and decide(cuda_graphs=True) == (True, [])
    assert decide(cuda_graphs=False) == (False, [])  # the user's choice: nothing to log
    graphs, why = decide(finetuning_type="full")
    assert graphs is False and len(why) == 1 and why[0].startswith("finetuning_type: full")
    assert decide(finetuning_type="full", cuda_graphs=True) == (True, [])
    graphs, why = decide(packing=True)
    assert graphs is False and len(why) == 1 and why[0].startswith("packing (measured slower")
    assert decide(packing=True, cuda_graphs=True) == (True, [])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert decide() == (False, ["several processes (gradients are all-reduced outside a captured step)"])
    with pytest.raises(TunesmithError, match="cuda_graphs: true, but .*several processes"):
        decide(cuda_graphs=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE")
    assert decide() == (False, [])  # no GPU: off, and nothing worth a log line


def test_mixture_of_experts_models_are_not_captured():
    from types import SimpleNamespace

    from tunesmith.training.trainer import _experts

    class Config(SimpleNamespace):
        def get_text_config(self):
            return self

    assert _experts(SimpleNamespace(config=Config(num_local_experts=8)))
    assert _experts(SimpleNamespace(config=Config(num_experts=64)))
    assert not _experts(SimpleNamespace(config=Config(num_experts=None, hidden_size=64)))


def test_a_required_capture_that_fails_stops_the_run():
    from tunesmith.errors import TunesmithError

    model = torch.nn.Linear(3, 2)
    graphs = StepGraphs(list(model.parameters()), EagerCapturer(fail=True), required=True)
    with pytest.raises(TunesmithError, match="cuda_graphs: true, but capturing a training step failed"):
        graphs.step(_linear_step(model), _batch(1), 1.0)


def test_a_failed_capture_frees_the_graphs_and_keeps_the_window():
    reference, model = _twin_linears()
    capturer = EagerCapturer()
    graphs = StepGraphs(list(model.parameters()), capturer)
    graphs.step(_linear_step(model), _batch(1), 2.0)  # captured and replayed
    capturer.fail = True
    graphs.step(_linear_step(model), _batch(2, rows=5), 2.0)  # a new shape fails: eager from now on
    for b in (_batch(1), _batch(2, rows=5)):
        _linear_step(reference)(b, 2.0)
    assert graphs.off and not graphs.graphs and graphs.grads is None
    torch.testing.assert_close(model.weight.grad, reference.weight.grad)  # the window's sum so far is kept
    graphs.step(_linear_step(model), _batch(3), 2.0)  # a known shape runs eagerly too, adding to it
    _linear_step(reference)(_batch(3), 2.0)
    torch.testing.assert_close(model.weight.grad, reference.weight.grad)


def test_evaluation_batches_keep_their_own_shapes(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """Only training batches are padded to the grid; evaluation's are never replayed."""
    seen = {"train": [], "eval": []}
    real_step, real_predict = (
        trainer_module.TunesmithTrainer.training_step,
        trainer_module.TunesmithTrainer.prediction_step,
    )

    def training_step(self, model, inputs, *a, **k):
        seen["train"].append(LOSS_ROW_WEIGHTS in inputs)
        return real_step(self, model, inputs, *a, **k)

    def prediction_step(self, model, inputs, *a, **k):
        seen["eval"].append(LOSS_ROW_WEIGHTS in inputs)
        return real_predict(self, model, inputs, *a, **k)

    with monkeypatch.context() as m:
        _graphed_training(m, EagerCapturer())
        m.setattr(trainer_module.TunesmithTrainer, "training_step", training_step)
        m.setattr(trainer_module.TunesmithTrainer, "prediction_step", prediction_step)
        train(tiny_model_dir, sft_data, tmp_path / "out", flash_attn="varlen", max_steps=2, val_size=0.25,
              eval_strategy="steps", eval_steps=1, per_device_train_batch_size=3)  # fmt: skip
    assert seen["train"] and all(seen["train"])
    assert seen["eval"] and not any(seen["eval"])
