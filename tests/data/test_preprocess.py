"""Preprocessing per stage: exact token/label layouts, masking options, truncation, drops, pt chunking.

A small ChatML renderer and encoder defined here produce Rendered/Encoded with exact spans, so the
layouts below are independent of the template registry; tests at the end run the real templates.
"""

from __future__ import annotations

import pickle
from bisect import bisect_right

import pytest
from transformers import AutoTokenizer

from tunesmith.data.preprocess import (
    IGNORE_INDEX,
    MaskingPolicy,
    codec_for,
    kind_kwargs,
    kto_batch,
    pairwise_batch,
    prompt_batch,
    pt_batch,
    run_kind,
    sft_batch,
)
from tunesmith.data.preprocess_fit import Codec
from tunesmith.data.templates import resolve_template
from tunesmith.data.types import Encoded, Rendered, Span
from tunesmith.errors import DataError, TunesmithError
from tunesmith.tiny import tiny_tokenizer_dir

TOK = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
END = "<|im_end|>"


def chatml(messages, tools="", add_generation_prompt=False) -> Rendered:
    """ChatML with spans: header and trailing newline unsupervised; assistant content + <|im_end|> supervised."""
    text, spans = "", []

    def add(piece: str, message: int, supervise: bool) -> None:
        nonlocal text
        spans.append(Span(len(text), len(text) + len(piece), message, supervise))
        text += piece

    for i, m in enumerate(messages):
        add(f"<|im_start|>{m['role']}\n", i, False)
        add(m["content"] + END, i, m["role"] == "assistant")
        add("\n", i, False)
    if add_generation_prompt:
        add("<|im_start|>assistant\n", -1, False)
    return Rendered(text, tuple(spans))


def encode(rendered: list[Rendered]) -> list[Encoded]:
    out = TOK([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for r, ids, offs in zip(rendered, out["input_ids"], out["offset_mapping"]):
        starts = [s.start for s in r.spans]
        result.append(Encoded(list(ids), [bisect_right(starts, a) - 1 for a, _ in offs], r.spans))
    return result


CODEC = Codec(render=chatml, encode=encode, tokenizer=TOK)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def conv(*turns: str, system: str | None = "You are terse.") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def supervised_text(labels: list[int]) -> str:
    return TOK.decode([t for t in labels if t != IGNORE_INDEX])


def sft(rows, **kw):
    kw.setdefault("cutoff_len", 1024)
    return sft_batch(rows, codec=CODEC, **kw)


# ---------------------------------------------------------------- layouts and masking


def test_sft_exact_layout():
    msgs = conv("What is 2 + 3?", "5.")
    b = sft([{"messages": msgs, "source": "d.json:1"}])
    prompt = ids(
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    body, nl = ids("5.<|im_end|>"), ids("\n")
    assert b.columns["input_ids"] == [prompt + body + nl]
    assert b.columns["labels"] == [[IGNORE_INDEX] * len(prompt) + body + [IGNORE_INDEX] * len(nl)]
    assert "weights" not in b.columns
    s = b.stats[0]
    assert (s.source, s.prompt_tokens, s.response_tokens) == ("d.json:1", len(prompt) - 3, 3 + len(body) + 1)
    assert s.total_tokens == len(prompt + body + nl) and not s.truncated and s.dropped is None
    assert s.supervised_tokens == len(body)


def test_masking_options_multi_turn():
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.")
    row = {"messages": msgs}
    assert supervised_text(sft([row]).columns["labels"][0]) == f"Red.{END}Blue.{END}"
    assert (
        supervised_text(sft([row], masking=MaskingPolicy(mask_history=True)).columns["labels"][0])
        == f"Blue.{END}"
    )
    b = sft([row], masking=MaskingPolicy(train_on_prompt=True))
    assert b.columns["labels"] == b.columns["input_ids"]
    both = sft([row], masking=MaskingPolicy(train_on_prompt=True, mask_history=True)).columns
    assert TOK.decode(
        [t for t, lab in zip(both["input_ids"][0], both["labels"][0]) if lab == IGNORE_INDEX]
    ) == (f"Red.{END}")


def test_train_false_and_weights():
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.")
    msgs[2] = {**msgs[2], "train": False}
    b = sft([{"messages": msgs}])
    assert supervised_text(b.columns["labels"][0]) == f"Blue.{END}" and "weights" not in b.columns
    b = sft([{"messages": msgs}], masking=MaskingPolicy(train_on_prompt=True))
    unlabelled = [
        t for t, lab in zip(b.columns["input_ids"][0], b.columns["labels"][0]) if lab == IGNORE_INDEX
    ]
    assert TOK.decode(unlabelled) == f"<|im_start|>assistant\nRed.{END}\n"
    real_b = sft_batch(
        [{"messages": msgs}], codec=real("chatml"), cutoff_len=64, masking=MaskingPolicy(train_on_prompt=True)
    )
    assert real_b.columns == b.columns
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.")
    msgs[2] = {**msgs[2], "weight": 0.5}
    b = sft([{"messages": msgs}, {"messages": conv("Hi", "Hello.")}])
    w, lab = b.columns["weights"][0], b.columns["labels"][0]
    red, blue = ids(f"Red.{END}"), ids(f"Blue.{END}")
    assert [x for x, y in zip(w, lab) if y != IGNORE_INDEX] == [0.5] * len(red) + [1.0] * len(blue)
    assert all(x == 0.0 for x, y in zip(w, lab) if y == IGNORE_INDEX)
    assert set(b.columns["weights"][1]) == {0.0, 1.0}
    assert "weights" in sft([{"messages": conv("Hi", "Hello.")}], with_weights=True).columns


def test_no_supervised_tokens_dropped_and_bad_row_named():
    msgs = conv("Hi", "Hello.")
    msgs[-1] = {**msgs[-1], "train": False}
    b = sft([{"messages": msgs, "source": "f.jsonl:7"}, {"messages": conv("Hi", "Hey.")}])
    assert len(b.columns["input_ids"]) == 1 and b.dropped() == {"no_supervised_tokens": 1}
    assert b.stats[0].dropped == "no_supervised_tokens" and b.stats[0].source == "f.jsonl:7"
    with pytest.raises(TunesmithError, match="cutoff_len must be at least 1"):
        sft([{"messages": conv("Hi", "Hey.")}], cutoff_len=0)
    with pytest.raises(DataError, match=r"f.jsonl:9.*must end with an assistant turn"):
        sft([{"messages": conv("Hi"), "source": "f.jsonl:9"}])


# ---------------------------------------------------------------- truncation


def test_boundary_exact_fit_is_untouched_and_one_less_truncates():
    row = {"messages": conv("Tell me about the river and the mountain city.", "A long answer about water.")}
    n = sft([row]).stats[0].total_tokens
    at = sft([row], cutoff_len=n)
    assert len(at.columns["input_ids"][0]) == n and not at.stats[0].truncated
    under = sft([row], cutoff_len=n - 1)
    assert len(under.columns["input_ids"][0]) <= n - 1 and under.stats[0].truncated
    assert supervised_text(under.columns["labels"][0]) == f"A long answer about water.{END}"
    assert not under.stats[0].response_truncated and under.stats[0].total_tokens == n


def test_history_exchanges_dropped_oldest_first_and_rerendered():
    long = " ".join(["word"] * 60)
    msgs = conv(f"First {long}", "One.", "Second question?", "Two.", "Third question?", "Three.")
    full = sft([{"messages": msgs}]).stats[0].total_tokens
    expected = sft([{"messages": [msgs[0], *msgs[3:]]}]).columns
    b = sft([{"messages": msgs}], cutoff_len=full - 10)
    assert b.columns["input_ids"] == expected["input_ids"] and b.columns["labels"] == expected["labels"]
    assert b.stats[0].truncated and supervised_text(b.columns["labels"][0]) == f"Two.{END}Three.{END}"


def test_last_prompt_content_cut_from_its_start_keeping_headers():
    content = " ".join(f"item {i}" for i in range(200))
    msgs = conv(content, "The final answer.")
    cutoff = 120
    b = sft([{"messages": msgs}], cutoff_len=cutoff)
    out = b.columns["input_ids"][0]
    assert cutoff - 2 <= len(out) <= cutoff and b.stats[0].truncated and not b.stats[0].response_truncated
    text = TOK.decode(out)
    head = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
    assert text.startswith(head)
    kept = text[len(head) : text.index(END, len(head))]
    assert 0 < len(kept) < len(content) and content.endswith(kept)
    assert text.endswith(f"<|im_start|>assistant\nThe final answer.{END}\n")
    assert supervised_text(b.columns["labels"][0]) == f"The final answer.{END}"


def test_response_longer_than_budget_loses_its_tail_and_eos():
    answer = " ".join(["the answer is long"] * 100)
    row = {"messages": conv("Question?", answer)}
    prompt = ids("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nQuestion?<|im_end|>\n")
    header = ids("<|im_start|>assistant\n")
    cutoff = 4 * len(prompt)  # the prompt fits in the floor of a quarter of the budget: kept whole
    b = sft([row], cutoff_len=cutoff)
    s = b.stats[0]
    out, labels = b.columns["input_ids"][0], b.columns["labels"][0]
    assert len(out) == cutoff and s.truncated and s.response_truncated and s.prompt_tokens == len(prompt)
    assert out[: len(prompt) + len(header)] == prompt + header
    assert labels[-1] != TOK.convert_tokens_to_ids(END) and answer.startswith(supervised_text(labels))
    assert s.supervised_tokens == cutoff - len(prompt) - len(header)
    # a longer prompt keeps exactly the floor (cutoff // 4): its head and its end, then the response
    b = sft([row], cutoff_len=cutoff - 8)
    out = b.columns["input_ids"][0]
    floor = (cutoff - 8) // 4
    assert len(out) == cutoff - 8 and out[floor : floor + len(header)] == header
    assert TOK.decode(out).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")


def test_drop_mode_drops_too_long_rows():
    rows = [
        {"messages": conv("Hi", "Hello."), "source": "a:1"},
        {"messages": conv(" ".join(["word"] * 200), "Ok."), "source": "a:2"},
    ]
    b = sft(rows, cutoff_len=64, truncation="drop")
    assert len(b.columns["input_ids"]) == 1 and b.dropped() == {"too_long": 1}
    assert b.stats[1].dropped == "too_long" and b.stats[1].total_tokens > 64


def test_batch_mixes_short_and_long_rows_in_order():
    rows = [{"messages": conv(f"Question {i} " + "word " * (i * 30), f"Answer {i}.")} for i in range(6)]
    b = sft(rows, cutoff_len=80)
    alone = [sft([r], cutoff_len=80).columns["input_ids"][0] for r in rows]
    assert b.columns["input_ids"] == alone and all(len(x) <= 80 for x in alone)
    assert [s.truncated for s in b.stats] == [s.total_tokens > 80 for s in b.stats]


# ---------------------------------------------------------------- other stages


def test_pairwise_shares_prompt_and_supervises_responses():
    row = {
        "messages": conv("Pick one."),
        "chosen": {"role": "assistant", "content": "Good."},
        "rejected": {"role": "assistant", "content": "A bad and longer answer."},
    }
    b = pairwise_batch([row], codec=CODEC, cutoff_len=1024)
    c, r = b.columns["chosen_input_ids"][0], b.columns["rejected_input_ids"][0]
    p = b.stats[0].prompt_tokens + 3
    assert c[:p] == r[:p] and c[p:] != r[p:]
    assert supervised_text(b.columns["chosen_labels"][0]) == f"Good.{END}"
    assert supervised_text(b.columns["rejected_labels"][0]) == f"A bad and longer answer.{END}"


def test_pairwise_truncation_cuts_the_shared_prompt_equally():
    row = {
        "messages": conv(" ".join(f"n{i}" for i in range(300))),
        "chosen": {"role": "assistant", "content": "Yes."},
        "rejected": {"role": "assistant", "content": "No, it is not so."},
    }
    b = pairwise_batch([row], codec=CODEC, cutoff_len=80)
    c, r = b.columns["chosen_input_ids"][0], b.columns["rejected_input_ids"][0]
    assert len(r) <= 80 and b.stats[0].truncated
    shared = len(c) - len(ids(f"<|im_start|>assistant\nYes.{END}\n"))
    assert c[:shared] == r[:shared]
    assert supervised_text(b.columns["rejected_labels"][0]) == f"No, it is not so.{END}"


def test_kto_keeps_tag_and_requires_it():
    rows = [
        {"messages": conv("Hi", "Hello."), "kto_tag": True},
        {"messages": conv("Hi", "Go away."), "kto_tag": False},
    ]
    b = kto_batch(rows, codec=CODEC, cutoff_len=64)
    assert b.columns["kto_tag"] == [True, False]
    assert supervised_text(b.columns["labels"][1]) == f"Go away.{END}"
    with pytest.raises(DataError, match="kto_tag"):
        kto_batch([{"messages": conv("Hi", "Hello."), "source": "k:1"}], codec=CODEC, cutoff_len=64)


def test_prompt_only_keeps_extras_and_reference():
    rows = [
        {"messages": conv("2+2?", "4"), "extra": {"answer": "4", "id": 1}},
        {"messages": conv("Capital of France?"), "extra": {"answer": "Paris"}},
    ]
    b = prompt_batch(rows, codec=CODEC, cutoff_len=64)
    cols = b.columns
    expected = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert cols["prompt_text"][0] == expected and cols["input_ids"][0] == ids(expected)
    assert cols["label_text"] == ["4", ""] and cols["answer"] == ["4", "Paris"] and cols["id"] == [1, None]


def test_prompt_only_truncation_keeps_generation_prompt():
    rows = [{"messages": conv(" ".join(f"x{i}" for i in range(300)))}]
    b = prompt_batch(rows, codec=CODEC, cutoff_len=50)
    text = b.columns["prompt_text"][0]
    assert len(b.columns["input_ids"][0]) <= 50 and text.endswith(f"{END}\n<|im_start|>assistant\n")
    assert text == TOK.decode(b.columns["input_ids"][0])


def test_pt_concatenates_with_eos_and_chunks():
    docs = ["hello world", "the river", "one two three four"]
    d = [ids(t) + ids(END) for t in docs]
    b = pt_batch(docs, tokenizer=TOK, cutoff_len=4, eos=END, packing=False)
    stream = d[0] + d[1] + d[2]
    assert [t for blk in b.columns["input_ids"] for t in blk] == stream
    assert (
        all(len(blk) == 4 for blk in b.columns["input_ids"][:-1])
        and b.columns["labels"] == b.columns["input_ids"]
    )


def test_pt_packing_keeps_documents_whole_and_splits_only_long_ones():
    docs = ["hello world", " ".join(["word"] * 30)]
    d = [ids(t) + ids(END) for t in docs]
    b = pt_batch(docs, tokenizer=TOK, cutoff_len=16, eos=END, packing=True)
    assert b.columns["input_ids"][0] == d[0]
    assert [t for blk in b.columns["input_ids"][1:] for t in blk] == d[1]
    assert [s.truncated for s in b.stats] == [False, True]
    with pytest.raises(DataError, match="eos token"):
        pt_batch(docs, tokenizer=TOK, cutoff_len=16, eos="<nope>", packing=True)


def test_run_kind_reports_stat_columns():
    cols, stats = run_kind(
        "sft",
        [{"messages": conv("Hi", "Hello.")}],
        codec=CODEC,
        cutoff_len=64,
        masking=MaskingPolicy(),
        truncation="keep_response",
    )
    assert len(cols["input_ids"]) == 1 and stats["dropped"] == {} and stats["truncated"] == [False]
    assert stats["supervised_tokens"] == [len(ids(f"Hello.{END}"))]


# ---------------------------------------------------------------- the real templates and encoder


def real(name: str) -> Codec:
    return codec_for(resolve_template(name, TOK), TOK)


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_real_template_supervises_answers_and_end_of_turn(name):
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.")
    codec = real(name)
    b = sft_batch([{"messages": msgs}], codec=codec, cutoff_len=1024)
    text = resolve_template(name, TOK).render(msgs).text
    assert b.columns["input_ids"][0] == ids(text)
    assert supervised_text(b.columns["labels"][0]) == f"Red.{END}Blue.{END}"
    if name == "chatml":  # the tiny tokenizer's own chat template is ChatML
        assert text == TOK.apply_chat_template(msgs, tokenize=False)
        assert b.columns == sft([{"messages": msgs}]).columns


@pytest.mark.parametrize("name", ["qwen", "llama2", "mistral"])
def test_real_template_truncation_rerenders_structure(name):
    """History drops re-render (system folded into the new first user turn); the response stays whole."""
    codec = real(name)
    msgs = conv("First " + "word " * 80, "One.", "Second?", "Two.")
    expected = sft_batch([{"messages": [msgs[0], *msgs[3:]]}], codec=codec, cutoff_len=1024).columns
    n = sft_batch([{"messages": msgs}], codec=codec, cutoff_len=1024).stats[0].total_tokens
    got = sft_batch([{"messages": msgs}], codec=codec, cutoff_len=n - 20)
    assert got.columns == expected and got.stats[0].truncated
    long = conv(" ".join(f"item {i}" for i in range(150)), "Done.")
    b = sft_batch([{"messages": long}], codec=codec, cutoff_len=100)
    out = b.columns["input_ids"][0]
    assert 96 <= len(out) <= 100 and not b.stats[0].response_truncated
    assert supervised_text(b.columns["labels"][0]).strip().startswith("Done.")
    full = resolve_template(name, TOK).render(long).text
    text = TOK.decode(out)
    assert text.startswith(full[: full.index("item 0")]) and text.endswith(full[full.index("item 149") :])


@pytest.mark.parametrize("kind", ["sft", "pairwise", "kto", "prompt", "pt"])
def test_kind_kwargs_and_run_kind_with_a_real_template(kind):
    turn = conv("Hi", "Hello.")
    row = {
        "sft": {"messages": turn},
        "kto": {"messages": turn, "kto_tag": False},
        "pairwise": {
            "messages": turn[:-1],
            "chosen": turn[-1],
            "rejected": {"role": "assistant", "content": "No."},
        },
        "prompt": {"messages": turn, "extra": {"answer": "Hello."}},
        "pt": {"text": "hello world"},
    }[kind]
    kwargs = kind_kwargs(
        kind,
        tokenizer=TOK,
        template=resolve_template("qwen", TOK),
        cutoff_len=64,
        mask_history=False,
        packing=kind == "pt",
    )
    kwargs = pickle.loads(pickle.dumps(kwargs))  # worker processes may receive them pickled
    cols, stats = run_kind(kind, [row, row], **kwargs)
    assert all(len(v) == 2 for v in cols.values()) and stats["dropped"] == {}
    assert len(stats["total_tokens"]) == 2 and stats["total_tokens"][0] > 0
