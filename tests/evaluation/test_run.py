"""`run(cfg)` end to end on the tiny model and the bundled sample benchmark, checked against plain forwards."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.evaluation import ChoiceReport, PerplexityReport, run
from tunesmith.evaluation.benchmark import load_benchmark
from tunesmith.evaluation.choice import choice_probs

HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


def config(model: Path, **keys):
    """A config for the tiny model; fp32 on any device, so that plain fp32 forwards on CPU compare."""
    keys = {"model_name_or_path": model, "infer_dtype": "float32", **keys}
    return tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()])


def by_hand(model_dir: Path, task: str, n_shot: int) -> dict[tuple[str, int], tuple[str, list[float]]]:
    """Each question's prompt written out by hand, tokenized with the tokenizer's own chat template and
    scored alone with a plain forward: argmax of the last position's logits over the letters' tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    letters = tok.convert_tokens_to_ids(["A", "B", "C", "D"])

    def turn(q) -> str:
        return q.question + "".join(f"\n{c}. {t}" for c, t in zip("ABCD", q.choices)) + "\nAnswer:"

    out = {}
    for subject in load_benchmark("unused", task, n_shot=n_shot).subjects:
        for q in subject.questions:
            messages = []
            for shot in subject.shots[:n_shot]:
                messages += [
                    {"role": "user", "content": turn(shot)},
                    {"role": "assistant", "content": shot.answer},
                ]
            messages.append({"role": "user", "content": turn(q)})
            messages[0]["content"] = HEADER.format(subject.name) + messages[0]["content"]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1, letters]
            out[(subject.key, q.index)] = ("ABCD"[int(logits.argmax())], torch.softmax(logits, -1).tolist())
    return out


def test_sample_benchmark_is_deterministic_and_matches_plain_forwards(tiny_model_dir):
    cfg = config(tiny_model_dir, task="sample_test", n_shot=2, batch_size=3)
    first, second = run(cfg, show_progress=False), run(cfg, show_progress=False)
    assert isinstance(first, ChoiceReport) and first.to_json() == second.to_json()
    assert [p.probs for p in first.predictions] == [p.probs for p in second.predictions]

    expected = by_hand(tiny_model_dir, "sample_test", 2)
    assert len(first.predictions) == len(expected) == 24
    for p in first.predictions:
        letter, probs = expected[(p.subject, p.index)]
        assert p.prediction == letter and p.shots == 2
        assert p.probs == pytest.approx(probs, abs=1e-5)
    for subject, score in first.subject_scores().items():
        hand = [(letter, k) for k, (letter, _) in expected.items() if k[0] == subject]
        answers = {(p.subject, p.index): p.answer for p in first.predictions}
        assert score.correct == sum(letter == answers[k] for letter, k in hand) and score.total == 8
    assert first.overall.correct == sum(s.correct for s in first.subject_scores().values())


def always_answers(model_dir: Path, out: Path, letter: str) -> Path:
    """The tiny model with weights set so that its next token is always `letter`: residual dimension 0
    holds a large constant (set in every embedding, never written by a layer) and the head reads only it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    target = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(letter)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[target, 0] = 1.0
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copyfile(f, out / f.name)
    return out


def test_a_model_that_always_answers_b_scores_the_share_of_b_answers(tiny_model_dir, tmp_path):
    model = always_answers(tiny_model_dir, tmp_path / "always-b", "B")
    report = run(config(model, task="sample_test", n_shot=1), show_progress=False)
    assert {p.prediction for p in report.predictions} == {"B"}
    data = report.to_json()
    assert {k: (v["correct"], v["total"]) for k, v in data["subjects"].items()} == {
        "arithmetic": (1, 8),
        "geography": (2, 8),
        "science": (2, 8),
    }
    assert data["categories"] == {
        "STEM": {"accuracy": round(3 / 16, 6), "correct": 3, "total": 16},
        "Social Sciences": {"accuracy": 0.25, "correct": 2, "total": 8},
    }
    assert data["average"] == {"accuracy": round(5 / 24, 6), "correct": 5, "total": 24}
    zh = run(config(model, task="sample_zh_test", lang="zh", template="chatml"), show_progress=False)
    assert (zh.overall.correct, zh.overall.total) == (2, 8)
    assert "Average" in zh.summary() and "25.00" in zh.summary()


def test_save_dir_writes_results_and_never_replaces_different_ones(tiny_model_dir, tmp_path):
    save = tmp_path / "eval"
    report = run(config(tiny_model_dir, task="sample_test", n_shot=0, save_dir=save), show_progress=False)
    assert report.save_dir == save
    results = json.loads((save / "results.json").read_text(encoding="utf-8"))
    assert results["task"] == "sample_test" and results["average"]["total"] == 24 and results["n_shot"] == 0
    lines = [json.loads(x) for x in (save / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 24 and set(lines[0]) >= {"subject", "index", "prediction", "answer", "probs"}
    assert sum(lines[0]["probs"].values()) == pytest.approx(1, abs=1e-5)
    run(
        config(tiny_model_dir, task="sample_test", n_shot=0, save_dir=save), show_progress=False
    )  # same: fine
    with pytest.raises(TunesmithError, match="different results"):
        run(config(tiny_model_dir, task="sample_test", n_shot=1, save_dir=save), show_progress=False)


def test_choice_probs_without_logits_to_keep_match(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    class Plain(torch.nn.Module):  # a model whose forward has no logits_to_keep: full logits are read
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    kept = choice_probs(model, prompts, [41, 42, 43, 44], batch_size=2, pad_id=0, show_progress=False)
    full = choice_probs(Plain(), prompts, [41, 42, 43, 44], batch_size=3, pad_id=0, show_progress=False)
    for a, b in zip(kept, full):
        assert a == pytest.approx(b, abs=1e-5)


def _nll_by_hand(model_dir: Path, rows: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Sum of -log p(token) over each row's tokens from position `start` on, one plain forward per row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for ids, start in rows:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
        count += len(ids) - start
    return total, count


def test_perplexity_of_text_documents_equals_a_plain_forward(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat. " * (1 + i % 4) for i in range(6)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    report = run(
        config(tiny_model_dir, task="perplexity", stage="pt", eval_dataset=data, cutoff_len=24, batch_size=4),
        show_progress=False,
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chunks = []
    for t in texts:  # each document + eos, cut into cutoff_len pieces, every token after the first scored
        doc = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        chunks += [(doc[i : i + 24], 1) for i in range(0, len(doc), 24)]
    assert any(len(c) < 24 for c, _ in chunks[1:]) and len(chunks) > len(texts)  # some documents were cut
    nll, tokens = _nll_by_hand(tiny_model_dir, chunks)
    assert isinstance(report, PerplexityReport)
    assert (report.nll.samples, report.nll.tokens) == (len(chunks), tokens)
    assert report.nll.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert report.to_json()["scored"] == "eval_dataset"


def test_perplexity_of_sft_responses_equals_a_plain_forward(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    pairs = [
        (f"Name city {i}.", f"It is {c}.") for i, c in enumerate(["Paris", "Rome", "Oslo", "Lima", "Bern"])
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
            + "\n"
            for u, a in pairs
        ),
        encoding="utf-8",
    )
    report = run(config(tiny_model_dir, task="perplexity", dataset=data, batch_size=2), show_progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for u, a in pairs:  # the answer and its <|im_end|> are scored, given the prompt
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        rows.append((p_ids + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(p_ids)))
    nll, tokens = _nll_by_hand(tiny_model_dir, rows)
    assert (report.nll.samples, report.nll.tokens) == (5, tokens)
    assert report.nll.mean_nll == pytest.approx(nll / tokens, rel=1e-5)
    assert report.nll.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_errors_come_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(TunesmithError, match="task is not set"):
        run(config(missing))
    with pytest.raises(TunesmithError, match="stage pt .* or sft"):
        run(config(missing, task="perplexity", stage="dpo", dataset="x.json"))
    with pytest.raises(TunesmithError, match="needs data"):
        run(config(missing, task="perplexity"))
    with pytest.raises(TunesmithError, match="no 'test' split of benchmark 'mmlu'"):
        run(config(missing, task="mmlu_test", task_dir=tmp_path))
