"""The HF engine: greedy means greedy, batching changes nothing, stops, streaming, adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import load_engine
from tunesmith.infer.settings import SamplingSettings

GREEDY = SamplingSettings(do_sample=False, max_new_tokens=24)


def _engine(model: Path, **over):
    keys = {"model_name_or_path": str(model), "template": "qwen", **over}
    return load_engine(tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()]))


def _ask(engine, i: int) -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": f"Name the capital city number {i}."}])


def _plain_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand: argmax of the next-token logits, no cache, no generation config."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def test_greedy_ignores_the_models_shipped_sampling_defaults(trained_full: Path, tmp_path: Path) -> None:
    shipped = json.loads((trained_full / "generation_config.json").read_text())
    shipped |= {"do_sample": True, "temperature": 1.7, "top_k": 3, "repetition_penalty": 1.8}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in trained_full.iterdir():
        if f.is_file():
            (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "generation_config.json").write_text(json.dumps(shipped))
    engine = _engine(model_dir)
    assert engine.description["ignored_model_generation_defaults"]["repetition_penalty"] == 1.8
    ids = _ask(engine, 1)
    runs = [engine.generate([ids], GREEDY)[0][0] for _ in range(3)]
    assert len({tuple(c.token_ids) for c in runs}) == 1
    by_hand = _plain_greedy(engine.model, ids, len(runs[0].token_ids))
    assert runs[0].token_ids == by_hand


def test_batched_left_padded_generation_equals_one_by_one(trained_full: Path) -> None:
    engine = _engine(trained_full)
    prompts = [
        engine.prompt_ids([{"role": "user", "content": "Name the capital city number 2." + " Please." * k}])
        for k in range(4)
    ]
    together = [c[0] for c in engine.generate(prompts, GREEDY)]
    alone = [engine.generate([p], GREEDY)[0][0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in together] == [len(p) for p in prompts]


def test_the_trained_model_answers_and_stops_on_the_template_stop_token(trained_full: Path) -> None:
    engine = _engine(trained_full)
    c = engine.generate([_ask(engine, 0)], GREEDY)[0][0]
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] in engine.stop_ids
    assert c.text.startswith("The capital is") and "<|im_end|>" not in c.text
    assert c.completion_tokens == len(c.token_ids) < GREEDY.max_new_tokens


def test_length_and_stop_strings(trained_full: Path) -> None:
    engine = _engine(trained_full)
    ids = _ask(engine, 0)
    short = engine.generate([ids], SamplingSettings(do_sample=False, max_new_tokens=2))[0][0]
    assert short.finish_reason == "length" and short.completion_tokens == 2
    full = engine.generate([ids], GREEDY)[0][0]
    word = full.text.split()[2]  # "The capital is X": stop at the third word
    cut = engine.generate([ids], GREEDY.with_overrides(stop=[word]))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(word)]


def test_streaming_gives_the_same_text_piece_by_piece(trained_full: Path) -> None:
    engine = _engine(trained_full)
    ids = _ask(engine, 3)
    events = list(engine.stream(ids, GREEDY))
    final = events[-1].completion
    assert final is not None
    reference = engine.generate([ids], GREEDY)[0][0]
    assert "".join(e.text for e in events) == reference.text == final.text
    assert final.token_ids == reference.token_ids and final.finish_reason == "stop"
    word = reference.text.split()[1]
    cut = list(engine.stream(ids, GREEDY.with_overrides(stop=[word])))
    assert "".join(e.text for e in cut) == reference.text[: reference.text.index(word)]


def test_sampling_with_a_seed_repeats_and_n_gives_n_answers(trained_full: Path) -> None:
    engine = _engine(trained_full)
    s = SamplingSettings(do_sample=True, temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=12, seed=7, n=3)
    a = engine.generate([_ask(engine, 1)], s)[0]
    b = engine.generate([_ask(engine, 1)], s)[0]
    assert len(a) == 3 and [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # temperature 1.5: the three differ


def test_temperature_zero_is_greedy_and_greedy_n_is_refused() -> None:
    s = SamplingSettings().with_overrides(temperature=0)
    assert s.greedy and s.effective()["do_sample"] is False
    with pytest.raises(TunesmithError, match="identical"):
        SamplingSettings(do_sample=False, n=2)
    assert "temperature" not in SamplingSettings(do_sample=False).effective()


def test_a_lora_adapter_is_loaded_merged_and_answers_like_peft(
    trained_lora: Path, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_model_dir, adapter_name_or_path=str(trained_lora))
    assert engine.description["adapters"] == [str(trained_lora)]
    ids = _ask(engine, 2)
    mine = engine.generate([ids], GREEDY)[0][0]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_lora)
    assert mine.token_ids == _plain_greedy(reference.eval(), ids, len(mine.token_ids))


def test_a_folder_without_adapter_config_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match="adapter_config.json"):
        _engine(tiny_model_dir, adapter_name_or_path=str(tmp_path))


def test_a_stream_closed_early_stops_generation_before_the_model_is_free(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir)  # untrained: it rarely stops on its own
    ids = _ask(engine, 1)
    settings = SamplingSettings(do_sample=False, max_new_tokens=300)
    calls = []
    hook = engine.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = engine.generate([ids], settings)[0][0]
        # precondition (deterministic: fixed seed): the untrained model runs to max_new_tokens
        assert full.finish_reason == "length"
        whole = len(calls)
        calls.clear()
        events = engine.stream(ids, settings)
        next(events)
        events.close()  # the client went away after the first piece
        assert not engine._lock.locked()
        assert len(calls) < whole // 2  # generation was cancelled, not run to the end
    finally:
        hook.remove()
    assert engine.generate([ids], settings)[0][0].token_ids == full.token_ids  # and the model is fine
