"""Proof that to_jinja(template), rendered by transformers' jinja, gives exactly our render(...).text.

Every built-in template, bound to the tiny tokenizer, on conversations covering system placement, default
system prompts, whitespace stripping, generation prompts, tools (both tool-call shapes, dict and string
arguments, grouped results), reasoning and enable_thinking. Where our renderer refuses a conversation the
jinja must raise too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from tunesmith.data.template_jinja import chat_template_for, to_jinja
from tunesmith.data.templates import (
    AutoTemplate,
    Template,
    get_template,
    list_templates,
    render,
    resolve_template,
)
from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.tiny import tiny_tokenizer_dir

SYS: Message = {"role": "system", "content": "  You are careful.\n"}
U1: Message = {"role": "user", "content": "Hi there!"}
A1: Message = {"role": "assistant", "content": "Hello! How can I help?"}
U2: Message = {"role": "user", "content": ' Say "{content}" & {{ x }} {% if %}\\n naïve café 😀\n'}
A2: Message = {"role": "assistant", "content": "\n Sure: {eos_token} <b>\\ok</b> \n"}
TOOLS = json.dumps(
    [
        {"name": "get_weather", "description": "Wetter für <Städte>", "parameters": {"type": "object"}},
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        },
    ]
)
CALLS: Message = {
    "role": "assistant",
    "content": "Let me check.",
    "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2], "x": None}},
        {"name": "noop", "arguments": '{"raw": not json}'},
    ],
}
CALL: Message = {"role": "assistant", "content": "", "tool_calls": [{"name": "noop", "arguments": {}}]}
RESULT: Message = {"role": "tool", "content": '{"temp_c": 21}'}
THINK: Message = {"role": "assistant", "content": "4", "reasoning": "\n2+2 is 4.\n"}
EMBEDDED: Message = {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nIt is 4."}
NO_REASONING: Message = {"role": "assistant", "content": "4", "reasoning": ""}

# (label, messages, tools, add_generation_prompt): every template meets every case.
CASES: list[tuple[str, list[Message], str, bool]] = [
    ("single turn", [U1, A1], "", False),
    ("multi turn", [U1, A1, U2, A2], "", False),
    ("system + multi turn", [SYS, U1, A1, U2, A2], "", False),
    ("prompt", [U1], "", True),
    ("system + history + prompt", [SYS, U1, A1, U2], "", True),
    ("system only + prompt", [SYS], "", True),
    ("assistant first", [A1, U1, A2], "", False),
    ("no user message", [SYS, A1], "", False),
    ("later system message", [U1, A1, SYS, U2, A2], "", False),
    ("tools + calls + grouped results", [SYS, U1, CALLS, RESULT, RESULT, A1], TOOLS, False),
    ("tools, no system, prompt after a result", [U1, CALL, RESULT], TOOLS, True),
    ("tool result first", [RESULT, U1, A1], "", False),
    ("reasoning in the final turn", [U1, THINK], "", False),
    ("reasoning before the last user", [U1, THINK, U2, THINK], "", False),
    ("reasoning inside the content", [U1, EMBEDDED, U2, EMBEDDED], "", False),
    ("empty reasoning given", [SYS, U1, NO_REASONING], "", False),
    ("unknown role", [U1, {"role": "narrator", "content": "x"}], "", False),
]
THINKING = (None, True, False)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


def hf_messages(messages: list[Message], nested: bool) -> list[dict[str, Any]]:
    """Our messages in HF's shape; ``nested`` puts tool calls under "function" (OpenAI), else flat."""
    out = []
    for m in messages:
        hf: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if "tool_calls" in m:
            calls = [dict(c) for c in m["tool_calls"]]
            hf["tool_calls"] = [{"type": "function", "function": c} for c in calls] if nested else calls
        if "reasoning" in m:
            hf["reasoning_content" if nested else "reasoning"] = m["reasoning"]
        out.append(hf)
    return out


def jinja_text(
    chat_template: str,
    messages: list[Message],
    tools: str,
    gen: bool,
    thinking: bool | None,
    tokens: dict[str, str],
    nested: bool,
) -> str:
    kwargs: dict[str, Any] = dict(tokens)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    texts, _ = render_jinja_template(
        conversations=[hf_messages(messages, nested)],
        tools=json.loads(tools) if tools else None,  # bare schemas on purpose: the jinja wraps them
        chat_template=chat_template,
        add_generation_prompt=gen,
        **kwargs,
    )
    return texts[0]


def prove(template: Template, chat_template: str, tokens: dict[str, str]) -> tuple[int, int]:
    """Compare every case both ways; (cases rendered equal, cases refused by both)."""
    equal = refused = 0
    for label, messages, tools, gen in CASES:
        for thinking in THINKING if template.thinking else (None,):
            try:
                ours: str | None = render(
                    template, messages, tools=tools, add_generation_prompt=gen, enable_thinking=thinking
                ).text
            except TunesmithError:
                ours = None
            for nested in (False, True):
                where = f"{template.name}: {label} (thinking={thinking}, nested={nested})"
                if ours is None:
                    with pytest.raises(TemplateError):
                        jinja_text(chat_template, messages, tools, gen, thinking, tokens, nested)
                    refused += 1
                else:
                    got = jinja_text(chat_template, messages, tools, gen, thinking, tokens, nested)
                    assert got == ours, f"{where}\njinja: {got!r}\nours:  {ours!r}"
                    equal += 1
    return equal, refused


@pytest.mark.parametrize("name", list_templates())
def test_jinja_renders_exactly_like_the_template(name: str, tokenizer: Any) -> None:
    bound = resolve_template(name, tokenizer)
    assert isinstance(bound, Template)
    tokens = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token}
    equal, _ = prove(bound, to_jinja(bound), tokens)
    assert equal >= 10  # the plain chat cases render for every template
    # An unbound template's {eos_token} becomes the jinja variable apply_chat_template passes.
    assert prove(bound, to_jinja(get_template(name)), tokens)[0] == equal


# (template, case label, text it must contain): the proof above compares these, they are not refused.
EXERCISED = [
    (
        "qwen",
        "tools + calls + grouped results",
        '"arguments": {"city": "Zürich", "days": [1, 2], "x": null}}',
    ),
    ("qwen", "tools + calls + grouped results", "</tool_response>\n<tool_response>"),
    (
        "qwen",
        "tools, no system, prompt after a result",
        '{"type": "function", "function": {"name": "get_weather"',
    ),
    ("qwen3", "reasoning before the last user", "assistant\n4<|im_end|>\n<|im_start|>user"),
    ("qwen3", "reasoning before the last user", "assistant\n<think>\n2+2 is 4.\n</think>\n\n4<|im_end|>"),
    ("qwen3", "reasoning inside the content", "<think>\nold thoughts\n</think>\n\nIt is 4."),
    ("deepseekr1", "reasoning in the final turn", "<think>\n2+2 is 4.\n</think>\n\n4"),
    (
        "gemma3",
        "system + multi turn",
        "user\n  You are careful.\n\n\nHi there!",
    ),  # folded into the first user turn
    ("mistral", "system + history + prompt", "[INST]   You are careful.\n\n\n Say"),  # into the last one
    ("llama3.1", "single turn", "Cutting Knowledge Date"),  # always_system
    ("qwen", "prompt", "You are Qwen"),  # default system prompt
    ("gemma", "multi turn", "model\nSure: {eos_token} <b>\\ok</b><end_of_turn>"),  # stripped contents
]


@pytest.mark.parametrize(("name", "label", "expected"), EXERCISED)
def test_every_feature_is_exercised(name: str, label: str, expected: str, tokenizer: Any) -> None:
    """The proof is not vacuous: each feature's case renders (so it is compared) and shows the feature."""
    _, messages, tools, gen = next(c for c in CASES if c[0] == label)
    text = render(resolve_template(name, tokenizer), messages, tools=tools, add_generation_prompt=gen).text
    assert expected in text


def test_refusals_raise_in_jinja() -> None:
    gemma, gemma3 = get_template("gemma"), get_template("gemma3")
    with pytest.raises(TemplateError, match="no system prompt"):
        jinja_text(to_jinja(gemma), [SYS, U1], "", True, None, {}, False)
    with pytest.raises(TemplateError, match="no tool format"):
        jinja_text(to_jinja(gemma3), [U1], TOOLS, True, None, {}, False)
    with pytest.raises(TemplateError, match="no thinking tags"):
        jinja_text(to_jinja(gemma3), [U1, THINK], "", False, None, {}, True)
    with pytest.raises(TemplateError, match="conversation has none"):
        jinja_text(to_jinja(gemma3), [SYS, A1], "", False, None, {}, False)
    with pytest.raises(TemplateError, match="only first"):
        jinja_text(to_jinja(gemma3), [U1, A1, SYS], "", False, None, {}, False)


def test_qwen3_thinking_off_puts_the_empty_block_in_the_prompt() -> None:
    j = to_jinja(get_template("qwen3"))
    text = jinja_text(j, [U1], "", True, False, {}, False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_saved_tokenizer_renders_like_training(tmp_path: Any) -> None:
    for name in ("qwen3", "alpaca"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
        t = resolve_template(name, tokenizer)
        tokenizer.chat_template = chat_template_for(t, tokenizer)
        tokenizer.save_pretrained(tmp_path / name)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / name)
        messages = [SYS, U1, CALLS, RESULT, A1, U2] if t.tool_format else [SYS, U1, A1, U2]
        tools = TOOLS if t.tool_format else ""
        got = reloaded.apply_chat_template(
            hf_messages(messages, nested=True),
            tools=json.loads(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert got == render(t, messages, tools=tools, add_generation_prompt=True).text


def test_auto_template_is_saved_unchanged(tokenizer: Any) -> None:
    auto = resolve_template("auto", tokenizer)
    assert isinstance(auto, AutoTemplate)
    assert chat_template_for(auto, tokenizer) is tokenizer.chat_template
