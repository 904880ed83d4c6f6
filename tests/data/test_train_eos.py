"""train_eos (LLaMA-Factory's efficient_eos): GLM-style templates end every training sample with a
learned stop token, kept by truncation, once per sample; prompts, stop ids and other templates as before.

A GLM-like template written for the tiny tokenizer (its turns end with the next turn's ``<|im_start|>``)
and the real GLM templates bound to the tiny tokenizer run the same preprocessing code as training does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunesmith.cli import main
from tunesmith.data.fast_bpe import fast_bpe_for
from tunesmith.data.packing import pack, packed_rows
from tunesmith.data.preprocess import (
    IGNORE_INDEX,
    MaskingPolicy,
    codec_for,
    kto_batch,
    pairwise_batch,
    prompt_batch,
    sft_batch,
)
from tunesmith.data.stops import stop_token_ids
from tunesmith.data.templates import (
    AssistantFormat,
    Template,
    get_template,
    list_templates,
    render,
    resolve_template,
    with_train_eos,
)
from tunesmith.errors import TunesmithError
from tunesmith.tiny import tiny_tokenizer_dir

TOK = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
EOS = TOK.eos_token_id  # <|im_end|>
GLM = ("chatglm3", "glm4", "codegeex4")
CHATGLM3_FIXTURE = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "hf_tokenizers" / "chatglm3-6b"
)

# GLM's shape with tiny-tokenizer tokens: an answer ends with the next turn's role token, not with text.
GLM_LIKE = Template(
    name="glm_like",
    system="<|im_start|>system\n{content}",
    user="<|im_start|>user\n{content}",
    assistant=AssistantFormat(header="<|im_start|>assistant", body="\n{content}"),
    eos="<|im_start|>",
    stop_words=("<|im_start|>",),
    train_eos="{eos_token}",
).bind(TOK.bos_token, TOK.eos_token)
WITHOUT = dataclasses.replace(GLM_LIKE, train_eos="")


def templates() -> list[Template]:
    return [GLM_LIKE, *(resolve_template(name, TOK) for name in GLM)]


def conv(*turns: str, **last: object) -> list[dict]:
    msgs = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    msgs[-1] = {**msgs[-1], **last}
    return msgs


def encode(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def sft(t: Template, rows: list[dict], **kw) -> tuple[list[int], list[int], object]:
    kw.setdefault("cutoff_len", 1024)
    b = sft_batch(rows, codec=codec_for(t, TOK), **kw)
    return b.columns["input_ids"][0], b.columns["labels"][0], b


def supervised(labels: list[int]) -> str:
    return TOK.decode([x for x in labels if x != IGNORE_INDEX])


# ---------------------------------------------------------------- the field and the GLM templates


def test_glm_templates_append_the_tokenizers_eos_and_no_other_template_does():
    assert {n for n in list_templates() if get_template(n).train_eos} == set(GLM)
    for name in GLM:
        t = get_template(name)
        assert t.train_eos == "{eos_token}" and t.unbound_placeholders == ()  # inference needs no tokenizer
        assert resolve_template(name, TOK).train_eos == TOK.eos_token
    with pytest.raises(TunesmithError, match="no eos_token"):
        get_template("glm4").bind("<s>", None)  # training would need it: say so when resolving


def test_chatglm3_fixture_eos_is_what_gets_appended():
    config = CHATGLM3_FIXTURE / "tokenizer_config.json"
    if not config.exists():
        pytest.skip(f"{config} not present")
    official = json.loads(config.read_text(encoding="utf-8"))
    assert official["eos_token"] == "</s>"  # ChatGLM3-6B; its turns end with <|user|>, not with the EOS
    t = get_template("chatglm3").bind(official.get("bos_token"), official["eos_token"])
    msgs = conv("Hi", "Hello")
    assert with_train_eos(t, render(t, msgs), msgs).text == "[gMASK]sop<|user|>\n Hi<|assistant|>\n Hello</s>"


def test_with_train_eos_needs_a_bound_template():
    msgs = conv("Hi", "Hello")
    t = get_template("glm4")
    with pytest.raises(TunesmithError, match="train_eos"):
        with_train_eos(t, render(t, msgs), msgs)


# ---------------------------------------------------------------- (a) sft: last label, prompts unchanged


@pytest.mark.parametrize("t", templates(), ids=lambda t: t.name)
def test_sft_ends_with_a_supervised_eos_and_prompts_are_unchanged(t: Template):
    msgs = conv("What is 2 + 3?", "5.")
    ids, labels, b = sft(t, [{"messages": msgs}])
    assert ids == encode(render(t, msgs).text) + [EOS]
    assert labels[-1] == ids[-1] == EOS and supervised(labels).endswith("5." + TOK.eos_token)
    assert b.stats[0].total_tokens == len(ids) and b.stats[0].supervised_tokens == len(encode("\n5.")) + 1
    # prompts (predict, chat, api, rollouts) never carry it
    prompt = prompt_batch([{"messages": msgs}], codec=codec_for(t, TOK), cutoff_len=1024).columns
    want = render(t, msgs[:1], add_generation_prompt=True).text
    assert prompt["prompt_text"] == [want] and prompt["input_ids"] == [encode(want)]
    assert EOS not in prompt["input_ids"][0] and not render(t, msgs).text.endswith(TOK.eos_token)


def test_without_the_field_the_last_label_is_not_a_stop_token():
    """The bug being fixed: a GLM-style answer ends with no learned stop token."""
    ids, labels, _ = sft(WITHOUT, [{"messages": conv("What is 2 + 3?", "5.")}])
    assert labels[-1] == ids[-1] != EOS and EOS not in ids


def test_same_tokens_through_the_fast_bpe_twin():
    fast = fast_bpe_for(TOK)
    assert fast is not None, "the tiny byte-level BPE tokenizer has a verified tiktoken twin"
    rows = [{"messages": conv("Name a color.", "Red.", "Another?", "Blue.")}, {"messages": conv("Hi", "Yo")}]
    for t in templates():
        slow = sft_batch(rows, codec=codec_for(t, TOK), cutoff_len=1024).columns
        assert sft_batch(rows, codec=codec_for(t, TOK, fast=fast), cutoff_len=1024).columns == slow


# ---------------------------------------------------------------- (b) truncation keeps it


@pytest.mark.parametrize("t", templates(), ids=lambda t: t.name)
def test_truncation_keeps_the_eos_last(t: Template):
    long_answer = conv("Say it.", "word " * 200)
    ids, labels, b = sft(t, [{"messages": long_answer}], cutoff_len=40)
    assert len(ids) == 40 and ids[-1] == labels[-1] == EOS and ids.count(EOS) == 1
    assert b.stats[0].response_truncated and labels[-2] == ids[-2] == encode(" word")[0]
    long_prompt = conv("please " * 200, "Done.")
    ids, labels, b = sft(t, [{"messages": long_prompt}], cutoff_len=40)
    assert len(ids) <= 40 and labels[-1] == EOS and supervised(labels).endswith("Done." + TOK.eos_token)
    assert b.stats[0].truncated and not b.stats[0].response_truncated
    # drop mode counts the EOS: exactly one token too many is too long
    n = len(sft(t, [{"messages": conv("Hi", "Yo")}])[0])
    assert sft_batch([{"messages": conv("Hi", "Yo")}], codec=codec_for(t, TOK), cutoff_len=n - 1,
                     truncation="drop").dropped() == {"too_long": 1}  # fmt: skip


def test_truncation_without_the_field_loses_the_end():
    ids, labels, _ = sft(WITHOUT, [{"messages": conv("Say it.", "word " * 200)}], cutoff_len=40)
    assert len(ids) == 40 and labels[-1] == encode(" word")[0]


def test_packing_keeps_each_document_ending_with_its_eos():
    rows = [{"messages": conv(f"Q{i}?", "answer " * (i + 1))} for i in range(6)]
    rows.append({"messages": conv("Long?", "word " * 100)})
    cols = sft_batch(rows, codec=codec_for(GLM_LIKE, TOK), cutoff_len=48).columns
    packed = packed_rows(cols, pack([len(x) for x in cols["input_ids"]], 48))
    docs = 0
    for labels, ids, lens in zip(packed["labels"], packed["input_ids"], packed["seq_lens"]):
        at = 0
        for n in lens:
            assert labels[at + n - 1] == ids[at + n - 1] == EOS and ids[at : at + n].count(EOS) == 1
            at, docs = at + n, docs + 1
    assert docs == len(rows)


# ---------------------------------------------------------------- (c) once per sample, masking, weights


def test_multi_turn_gets_it_once_at_the_end():
    """LLaMA-Factory appends eos_token_id once, after its turn loop (processor/supervised.py). (It also
    writes EOS into the label of each later turn's first prompt token; our labels are the input tokens.)"""
    t = GLM_LIKE
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.")
    ids, labels, _ = sft(t, [{"messages": msgs}])
    assert ids.count(EOS) == 1 and ids[-1] == EOS
    assert ids == encode(render(t, msgs).text) + [EOS]
    assert supervised(labels) == "\nRed.\nBlue." + TOK.eos_token
    _, labels, _ = sft(t, [{"messages": msgs}], masking=MaskingPolicy(mask_history=True))
    assert supervised(labels) == "\nBlue." + TOK.eos_token
    ids, labels, _ = sft(t, [{"messages": msgs}], masking=MaskingPolicy(train_on_prompt=True))
    assert labels == ids


def test_it_belongs_to_the_final_answer_train_and_weight():
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.", train=False)
    ids, labels, _ = sft(GLM_LIKE, [{"messages": msgs}])
    assert ids[-1] == EOS and labels[-1] == IGNORE_INDEX and supervised(labels) == "\nRed."
    msgs = conv("Name a color.", "Red.", "Another?", "Blue.", weight=0.5)
    b = sft_batch([{"messages": msgs}], codec=codec_for(GLM_LIKE, TOK), cutoff_len=1024).columns
    assert b["labels"][0][-1] == EOS and b["weights"][0][-1] == 0.5


def test_preference_responses_end_with_it():
    codec = codec_for(GLM_LIKE, TOK)
    pair = {"messages": conv("Pick one."), "chosen": conv("x", "Good.")[1], "rejected": conv("x", "Bad.")[1]}
    cols = pairwise_batch([pair], codec=codec, cutoff_len=1024).columns
    for side, answer in (("chosen", "Good."), ("rejected", "Bad.")):
        ids, labels = cols[f"{side}_input_ids"][0], cols[f"{side}_labels"][0]
        assert ids[-1] == labels[-1] == EOS and ids.count(EOS) == 1
        assert supervised(labels) == f"\n{answer}{TOK.eos_token}"
    long = {**pair, "chosen": conv("x", "good " * 100)[1]}
    cols = pairwise_batch([long], codec=codec, cutoff_len=40).columns
    assert all(cols[f"{s}_labels"][0][-1] == EOS for s in ("chosen", "rejected"))
    assert len(cols["chosen_input_ids"][0]) <= 40
    kto = [{"messages": conv("Hi", "Yo"), "kto_tag": False}]
    cols = kto_batch(kto, codec=codec, cutoff_len=1024).columns
    assert cols["labels"][0][-1] == cols["input_ids"][0][-1] == EOS


# ---------------------------------------------------------------- (d) stop ids


def test_stop_ids_include_it():
    tool_call = TOK.convert_tokens_to_ids("<tool_call>")
    other = dataclasses.replace(GLM_LIKE, train_eos="<tool_call>")  # a train_eos that is not the EOS
    assert tool_call in stop_token_ids(TOK, other) and tool_call not in stop_token_ids(TOK, WITHOUT)
    for t in templates():
        assert EOS in stop_token_ids(TOK, t)


# ---------------------------------------------------------------- (e) other templates unchanged


def test_templates_without_it_render_training_samples_as_before():
    msgs = conv("Name a color.", "Red.")
    for name in list_templates():
        if name in GLM:
            continue
        t = resolve_template(name, TOK)
        r = render(t, msgs)
        assert with_train_eos(t, r, msgs) is r


# Recorded before train_eos existed: qwen (default system prompt), tiny tokenizer, two turns.
QWEN_IDS = [
    1, 965, 207, 1137, 558, 229, 57, 95, 382, 20, 675, 76, 481, 229, 41, 84, 81, 74, 73, 74, 73, 229, 43, 84,
    274, 76, 22, 229, 1137, 558, 336, 337, 84, 88, 78, 93, 84, 624, 22, 2, 207, 1, 464, 207, 54, 645, 336,
    621, 22, 2, 207, 1, 488, 207, 58, 438, 22, 2, 207, 1, 464, 207, 990, 653, 39, 2, 207, 1, 488, 207, 42,
    84, 346, 22, 2, 207,
]  # fmt: skip
QWEN_LABELS = (
    [IGNORE_INDEX] * 54 + [58, 438, 22, 2] + [IGNORE_INDEX] * 12 + [42, 84, 346, 22, 2, IGNORE_INDEX]
)
QWEN_CUT_IDS = [
    1, 965, 207, 1137, 558, 229, 57, 95, 382, 20, 675, 76, 481, 229, 41, 336, 337, 84, 88, 78, 93, 84, 624,
    22, 2, 207, 1, 464, 207, 2, 207, 1, 488, 207, 42, 84, 346, 22, 2, 207,
]  # fmt: skip
QWEN_CUT_LABELS = [IGNORE_INDEX] * 34 + [42, 84, 346, 22, 2, IGNORE_INDEX]


def test_qwen_sample_is_byte_for_byte_unchanged():
    t = resolve_template("qwen", TOK)
    rows = [{"messages": conv("Name a color.", "Red.", "Another?", "Blue.")}]
    ids, labels, _ = sft(t, rows)
    assert (ids, labels) == (QWEN_IDS, QWEN_LABELS)
    ids, labels, _ = sft(t, rows, cutoff_len=40)
    assert (ids, labels) == (QWEN_CUT_IDS, QWEN_CUT_LABELS)


# ---------------------------------------------------------------- `tunesmith check`


def _glm4_file(tmp_path: Path, train_eos: bool) -> str:
    """glm4 as a user template file (with or without train_eos)."""
    text = (
        "my_glm4:\n"
        '  bos: "[gMASK]<sop>"\n'
        '  system: "<|system|>\\n{content}"\n'
        '  user: "<|user|>\\n{content}"\n'
        '  assistant: {header: "<|assistant|>", body: "\\n{content}"}\n'
        '  eos: "<|user|>"\n'
        '  stop_words: ["<|observation|>", "<|endoftext|>"]\n'
    ) + ('  train_eos: "{eos_token}"\n' if train_eos else "")
    path = tmp_path / f"glm4_{train_eos}.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("cutoff_len", [1024, 24])
def test_check_no_longer_warns_for_glm(capsys, tmp_path, cutoff_len):
    rows = [{"instruction": f"q{i}", "output": "word " * (5 + 10 * i)} for i in range(4)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    warning = "training targets do not end with a stop token"
    base = [
        "check",
        f"model_name_or_path={tiny_tokenizer_dir()}",
        f"dataset={data}",
        f"cutoff_len={cutoff_len}",
    ]
    for template in ("glm4", _glm4_file(tmp_path, train_eos=True)):
        assert main([*base, f"template={template}"]) == 0
        out = capsys.readouterr().out
        assert "usable: yes" in out and warning not in out, out
    assert main([*base, f"template={_glm4_file(tmp_path, train_eos=False)}"]) == 0
    assert f"4 of 4 {warning}" in capsys.readouterr().out
