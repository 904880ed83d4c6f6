"""The template registry, the YAML schema and the generic renderer (no tokenizer needed)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunesmith.data import templates as T
from tunesmith.data.templates import AutoTemplate, get_template, list_templates, render, resolve_template
from tunesmith.data.types import Rendered
from tunesmith.errors import ConfigError, TunesmithError

SYS = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
U2, A2 = {"role": "user", "content": "And {content}?"}, {"role": "assistant", "content": "{eos_token} stays"}
REQUIRED = [
    "empty",
    "default",
    "alpaca",
    "vicuna",
    "chatml",
    "qwen",
    "qwen2.5",
    "qwen3",
    "qwen3_nothink",
    "llama2",
    "llama3",
    "llama3.1",
    "llama3.2",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3",
    "phi",
    "phi3",
    "phi4",
    "phi4-mini",
    "deepseek",
    "deepseek3",
    "deepseekr1",
    "yi",
    "glm4",
    "chatglm3",
    "baichuan2",
    "intern2",
    "falcon",
    "zephyr",
    "olmo",
    "olmo2",
    "smollm2",
    "openchat",
    "openchat-3.6",
    "granite3",
    "cohere",
]


def bound(name: str):
    return get_template(name).bind("<BOS>", "<EOS>")


def supervised(r: Rendered) -> list[str]:
    return [r.text[s.start : s.end] for s in r.spans if s.supervise]


def test_registry_has_35_plus_templates_and_the_known_names() -> None:
    names = list_templates()
    assert len(names) >= 35 and names == sorted(names)
    for name in REQUIRED:
        assert get_template(name).name in names, name
    assert get_template("Qwen2.5").name == "qwen" and get_template("qwen3-nothink").name == "qwen3_nothink"
    assert get_template("llama3_2").name == "llama3.1" and get_template("phi").name == "phi3"


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(TunesmithError, match=r"unknown chat template 'lama3'.*did you mean: .*llama3"):
        get_template("lama3")


@pytest.mark.parametrize("name", list_templates())
def test_every_template_renders_with_contiguous_spans(name: str) -> None:
    t = bound(name)
    has_system = t.system_placement != "unsupported"
    for msgs in ([U1, A1], [U1, A1, U2, A2], [SYS, U1, A1, U2, A2] if has_system else [U1, A1]):
        for gen in (False, True):
            r = render(t, msgs, add_generation_prompt=gen, enable_thinking=False)  # no think blocks here
            assert r.spans[0].start == 0 and r.spans[-1].end == len(r.text)
            assert all(a.end == b.start and a.start < a.end for a, b in zip(r.spans, r.spans[1:]))
            assert all(-1 <= s.message < len(msgs) for s in r.spans)
            # One supervised body per answer: its content and the end-of-turn text, nothing else.
            answers = [m for m in msgs if m["role"] == "assistant"]
            assert [s.message for s in r.spans if s.supervise] == [msgs.index(a) for a in answers]
            for text, a in zip(supervised(r), answers):
                assert text == t.assistant.body.replace("{content}", a["content"])
                assert text.endswith(t.assistant.body.split("{content}")[1])
            if gen and t.generation_prompt:  # the generation prompt is the last text, of no message
                assert r.spans[-1].message == -1 and not r.spans[-1].supervise
                assert r.text[r.spans[-1].start :].startswith(t.generation_prompt)


def test_placeholders_in_content_are_not_expanded() -> None:
    r = render(bound("alpaca"), [U2, A2])
    assert "And {content}?" in r.text and supervised(r) == ["{eos_token} stays<EOS>"]


def test_system_placements() -> None:
    msgs = [SYS, U1, A1, U2, A2]
    assert render(get_template("chatml"), msgs).text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert render(get_template("gemma3"), msgs).text.startswith(
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of"
    )
    assert "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]" in render(get_template("llama2"), msgs).text
    mistral = render(get_template("mistral"), msgs).text
    assert "[INST] Hi[/INST]" in mistral and "[INST] Be brief.\n\nAnd {content}?[/INST]" in mistral
    with pytest.raises(TunesmithError, match="'gemma' has no system prompt.*gemma3"):
        render(get_template("gemma"), msgs)
    with pytest.raises(TunesmithError, match="only as the first message"):
        render(get_template("gemma3"), [U1, A1, SYS, U2])
    # A folded system prompt belongs to the user turn's span; an own turn is message 0's.
    r = render(get_template("gemma3"), msgs)
    assert [s.message for s in r.spans][:2] == [-1, 1]


def test_default_and_always_system() -> None:
    qwen = get_template("qwen")
    assert render(qwen, [U1]).text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert render(qwen, [SYS, U1]).text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert render(qwen, [U1]).spans[0].message == -1 and render(qwen, [SYS, U1]).spans[0].message == 0
    llama = render(get_template("llama3.1"), [U1]).text
    assert llama.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge"
    )
    assert "\n\n<|eot_id|><|start_header_id|>user" in llama
    assert render(get_template("qwen3"), [U1]).text == "<|im_start|>user\nHi<|im_end|>\n"


def test_train_false_keeps_a_turn_unsupervised() -> None:
    r = render(get_template("chatml"), [U1, {**A1, "train": False}, U2, A2])
    assert supervised(r) == ["{eos_token} stays<|im_end|>"]


def test_token_placeholders_need_a_tokenizer() -> None:
    with pytest.raises(TunesmithError, match=r"uses \{eos_token\}.*resolve_template"):
        render(get_template("alpaca"), [U1, A1])
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>", chat_template=None)
    t = resolve_template("alpaca", tok)
    assert t.eos == "</s>" and t.stop_words == ("</s>",) and supervised(render(t, [U1, A1])) == ["Hello</s>"]
    with pytest.raises(TunesmithError, match="has no eos_token"):
        get_template("vicuna").bind("<s>", None)


def test_auto_needs_a_chat_template() -> None:
    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>", chat_template=None)
    with pytest.raises(TunesmithError, match="has none .*chatml.*all: alpaca"):
        resolve_template("auto", tok)


def test_auto_template_spans_on_a_small_jinja_template() -> None:
    jinja = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    auto = AutoTemplate(jinja, (("bos_token", "<s>"), ("eos_token", "</s>")))
    r = auto.render([SYS, U1, A1, U2, A2])
    assert (
        r.text == "<s><system>Be brief.</s>\n<user>Hi</s>\n<assistant>Hello</s>\n<user>And {content}?</s>\n"
        "<assistant>{eos_token} stays</s>\n"
    )
    assert supervised(r) == ["Hello</s>", "{eos_token} stays</s>"]
    assert [s.message for s in r.spans] == [0, 1, 2, 2, 2, 3, 4, 4, 4]
    assert auto.eos == "</s>" and auto.stop_words == ("</s>",)
    reorder = AutoTemplate("{% for m in messages|reverse %}{{ m.content }}{% endfor %}")
    with pytest.raises(TunesmithError, match="not prefix-consistent"):
        reorder.render([U1, A1])


def test_tools_and_reasoning_errors() -> None:
    with pytest.raises(TunesmithError, match="no tool format"):
        render(get_template("llama3"), [U1], tools='[{"name": "f"}]')
    with pytest.raises(TunesmithError, match="cannot render tool results"):
        render(get_template("llama3"), [U1, {"role": "tool", "content": "1"}])
    with pytest.raises(TunesmithError, match="no thinking tags"):
        render(get_template("llama3"), [U1, {**A1, "reasoning": "x"}])
    with pytest.raises(TunesmithError, match="tools: not valid JSON"):
        render(get_template("qwen"), [U1], tools="[{")
    with pytest.raises(TunesmithError, match="unknown role 'bot'"):
        render(get_template("qwen"), [{"role": "bot", "content": "x"}])


def test_tool_calls_are_learned_and_results_grouped() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": "é"}}]}
    res = {"role": "tool", "content": "1"}
    r = render(get_template("qwen3_nothink"), [U1, call, res, res, A1], tools='{"name": "f"}')
    assert supervised(r)[0] == '<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call><|im_end|>'
    assert (
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n1\n</tool_response><|im_end|>"
        in r.text
    )
    assert '<tools>\n{"type": "function", "function": {"name": "f"}}\n</tools>' in r.text


def test_thinking_spans() -> None:
    qwen3 = get_template("qwen3")
    msgs = [U1, {**A1, "reasoning": "old"}, U2, {**A2, "reasoning": "\nnew\n"}]
    assert supervised(render(qwen3, msgs)) == [
        "Hello<|im_end|>",
        "<think>\nnew\n</think>\n\n{eos_token} stays<|im_end|>",
    ]
    off = render(qwen3, msgs, enable_thinking=False)
    assert supervised(off) == ["Hello<|im_end|>", "{eos_token} stays<|im_end|>"]
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n{eos_token}" in off.text
    assert render(qwen3, [U1], add_generation_prompt=True, enable_thinking=False).text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    r1 = get_template("deepseekr1").bind("<s>", "</s>")
    assert supervised(render(r1, [U1, A1])) == ["Hello<｜end▁of▁sentence｜>"]  # no empty block
    assert supervised(render(r1, [U1, {**A1, "content": "<think>\nr\n</think>\n\nHello"}]))[0].startswith(
        "<think>\nr\n</think>\n\nHello"
    )


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def test_user_yaml_template(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'mine:\n  user: "U: {content}\\n"\n  system: "S: {content}\\n"\n'
        '  assistant: {header: "A:", body: " {content}{eos_token}", suffix: "\\n"}\n'
        '  eos: "{eos_token}"\n',
    )
    t = get_template(path).bind(None, "</s>")
    r = render(t, [SYS, U1, A1], add_generation_prompt=False)
    assert r.text == "S: Be brief.\nU: Hi\nA: Hello</s>\n" and supervised(r) == [" Hello</s>"]
    assert t.source == path and t.generation_prompt == "A:"


def test_user_yaml_problems_are_all_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'mine:\n  usr: "U: {content}"\n  assistant: {body: "x", sufix: ""}\n'
        "  system_placement: first\n  eos: 3\n",
    )
    with pytest.raises(ConfigError) as err:
        get_template(path)
    text = str(err.value)
    assert path in text and "mine.usr: unknown field" in text and "did you mean 'user'" in text
    assert "mine.assistant.sufix: unknown field" in text and "mine.user: required field is missing" in text
    path = _write(
        tmp_path,
        'a:\n  user: "{content}"\n  assistant: {body: "{content}"}\n  system: "{content}"\n'
        "  system_placement: firs_user\n  eos: 3\n  strip: [usr]\n",
    )
    text = str(pytest.raises(ConfigError, get_template, path).value)
    assert "a.eos: expected str" in text and "use 'first_user'" in text and "got 'usr'" in text
    path = _write(tmp_path, 'a:\n  user: "U"\n  assistant: {body: "x"}\n  eos: ""\n  tool_format: hermes\n')
    text = str(pytest.raises(ConfigError, get_template, path).value)
    assert "a.user: must contain {content}" in text and "a.assistant.body: must contain" in text
    assert "a.system: must contain" in text and "unknown tool_format 'hermes'" in text
    path = _write(
        tmp_path,
        'a:\n  user: "{content}"\n  assistant: {body: "{content}"}\n  eos: ""\n  system: "{content}"\n'
        'b:\n  user: "{content}"\n  assistant: {body: "{content}"}\n  eos: ""\n  system: "{content}"\n',
    )
    with pytest.raises(TunesmithError, match="exactly one template; it defines 2: a, b"):
        get_template(path)
    with pytest.raises(TunesmithError, match="does not exist"):
        get_template(str(tmp_path / "missing.yaml"))


def test_every_schema_field_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "templates.md").read_text()
    classes = (T.Template, T.AssistantFormat, T.ToolTurn, T.Thinking)
    fields = {f.name for c in classes for f in dataclasses.fields(c)} - {"name", "source"}
    assert not [f for f in sorted(fields) if not re.search(rf"^\s+{f}:", doc, re.M)]


def test_module_render_equals_method() -> None:
    t = get_template("zephyr")
    assert render(t, [SYS, U1, A1]) == t.render([SYS, U1, A1])
