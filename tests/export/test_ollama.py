"""Proof that the Ollama Modelfile's TEMPLATE renders the prompt our renderer does.

Every built-in template (bound to the tiny tokenizer's tokens) meets conversations covering system
placement, default system prompts, the Modelfile SYSTEM, multi-turn history, the generation prompt, an
open final answer (Ollama's prefill), tool results, reasoning and think on/off. Each prompt is rendered as
Ollama renders it twice: by Go's text/template (tests/export/go_render, skipped without ``go``) and by
the Python evaluator in gotmpl.py (always), and both must equal ``render(...).text``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.export import gotmpl
from tunesmith.data.templates import AutoTemplate, Template, get_template, list_templates, render
from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.export.ollama import NoOllamaTranslation, modelfile_text, ollama_template

GO_DIR = Path(__file__).with_name("go_render")
HF_TOKENIZERS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "hf_tokenizers"

SYS: Message = {"role": "system", "content": "You are terse."}
U1: Message = {"role": "user", "content": "Hi there!"}
A1: Message = {"role": "assistant", "content": "Hello! How can I help?"}
U2: Message = {"role": "user", "content": 'Say "{content}" & {{ .Content }} """ {% x %}\\n naïve café 😀'}
A2: Message = {"role": "assistant", "content": "Sure: {eos_token} <b>\\ok</b>\n\nDone."}
CALL: Message = {"role": "assistant", "content": "Let me check."}
R1: Message = {"role": "tool", "content": '{"temp_c": 21}'}
R2: Message = {"role": "tool", "content": "sunny"}
THINK: Message = {"role": "assistant", "content": "4", "reasoning": "2+2 is 4."}
PADDED: Message = {"role": "user", "content": " \n Hi \t\n"}

# (label, messages, Modelfile SYSTEM, think): think None/True/False is Ollama's request `think` flag.
Case = tuple[str, list[Message], str, bool | None]


def _cases(t: Template) -> list[Case]:
    """The conversations template ``t`` can render (our renderer refuses the others)."""
    own, system_ok = t.system_placement == "own_turn", t.system_placement != "unsupported"
    cases: list[Case] = [
        ("user (default system)", [U1], "", None),
        ("multi turn", [U1, A1, U2], "", None),
        ("open final answer", [U1, A1, U2, A2], "", None),
        ("assistant first", [A1, U1], "", None),
    ]
    if system_ok:
        cases += [
            ("system + user", [SYS, U1], "", None),
            ("system + multi turn", [SYS, U1, A1, U2], "", None),
            ("Modelfile SYSTEM", [U1, A1, U2], "Be brief.", None),
            ("request system wins over Modelfile SYSTEM", [SYS, U1], "Be brief.", None),
            ("system + open final answer", [SYS, U1, A2], "", None),
        ]
    if own:
        cases.append(("later system message", [U1, A1, SYS, U2], "", None))
    if not t.strip:
        cases.append(("content with surrounding whitespace", [PADDED, A2, PADDED], "", None))
    if t.tool is not None:
        cases += [
            ("tool results, prompt", [U1, CALL, R1, R2], "", None),
            ("tool results, answer, next user", [U1, CALL, R1, A1, U2], "", None),
            ("tool result, open answer", [U1, CALL, R2, A2], "", None),
        ]
    if t.thinking is not None:
        cases += [
            (f"think {think}, {label}", messages, "", think)
            for think in (None, True, False)
            for label, messages in [
                ("prompt", [U1]),
                ("reasoning before the last user", [U1, THINK, U2]),
                ("open answer with reasoning", [U1, THINK]),
                ("open answer without reasoning", [U1, A1]),
            ]
        ]
    return cases


def _expected(t: Template, messages: list[Message], system: str, think: bool | None) -> str:
    """Our prompt: generation prompt after a non-assistant turn, else the final answer cut after its content."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    if messages[-1]["role"] != "assistant":
        return render(t, messages, add_generation_prompt=True, enable_thinking=think).text
    rendered = render(t, messages, enable_thinking=think)
    body = next(s for s in rendered.spans if s.message == len(messages) - 1 and s.supervise)
    tail = t.assistant.body[t.assistant.body.rindex("{content}") + len("{content}") :]
    return rendered.text[: body.end - len(tail)]


def _ollama_request(messages: list[Message]) -> list[dict[str, Any]]:
    """Our messages as an Ollama chat request sends them (reasoning travels as ``thinking``)."""
    return [
        {
            "role": m["role"],
            "content": m["content"],
            **({"thinking": m["reasoning"]} if "reasoning" in m else {}),
        }
        for m in messages
    ]


@pytest.fixture(scope="module")
def templates(tiny_tokenizer: Any) -> dict[str, Template]:
    return {
        name: get_template(name).bind(tiny_tokenizer.bos_token, tiny_tokenizer.eos_token)
        for name in list_templates()
    }


@pytest.fixture(scope="session")
def go_render(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Ollama's rendering in real Go: the go_render program, built once (stdlib only, offline)."""
    if shutil.which("go") is None:
        pytest.skip("go is not on PATH")
    tmp = tmp_path_factory.mktemp("go_render")
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOCACHE": str(tmp / "cache"),
        "GOPATH": str(tmp / "gopath"),
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    binary = tmp / "gorender"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GO_DIR, env=env, check=True, timeout=300)

    def run(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=True
        )
        return json.loads(proc.stdout)

    return run


@pytest.mark.parametrize("name", list_templates())
def test_python_rendering_equals_ours(templates: dict[str, Template], name: str) -> None:
    t = templates[name]
    go_template = ollama_template(t)
    assert ".Messages" in go_template  # Ollama takes its .Messages path only for templates that name it
    for label, messages, system, think in _cases(t):
        got = gotmpl.render_ollama(go_template, _ollama_request(messages), system, think)
        assert got == _expected(t, messages, system, think), f"{name}: {label}"


def test_go_rendering_equals_ours_and_python(templates: dict[str, Template], go_render: Any) -> None:
    cases, expected, python = [], [], []
    for name, t in templates.items():
        go_template = ollama_template(t)
        for label, messages, system, think in _cases(t):
            request = _ollama_request(messages)
            cases.append({"template": go_template, "messages": request, "system": system, "think": think})
            expected.append((f"{name}: {label}", _expected(t, messages, system, think)))
            python.append(gotmpl.render_ollama(go_template, request, system, think))
    # Ollama behaviour the Python side mirrors: consecutive messages of one role are merged.
    merged = [U1, {"role": "user", "content": "And one more."}]
    cases.append(
        {"template": ollama_template(templates["chatml"]), "messages": merged, "system": "", "think": None}
    )
    joined: Message = {"role": "user", "content": U1["content"] + "\n\nAnd one more."}
    expected.append(
        ("chatml: merged users", render(templates["chatml"], [joined], add_generation_prompt=True).text)
    )
    python.append(gotmpl.render_ollama(cases[-1]["template"], merged))
    results = go_render(cases)
    assert len(results) == len(cases) > 500
    for (label, want), got, py in zip(expected, results, python):
        assert not got.get("error"), f"{label}: {got['error']}"
        assert got["text"] == want, label
        assert py == got["text"], label


def test_thinking_tags_are_inferred_by_ollama(templates: dict[str, Template], go_render: Any) -> None:
    """Ollama gives a model the thinking capability (and splits <think> output) from tags around .Thinking."""
    names = list(templates)
    results = go_render([{"template": ollama_template(templates[n]), "messages": [U1]} for n in names])
    tags = {n: tuple(r["thinking_tags"]) for n, r in zip(names, results)}
    thinking = {n for n, t in templates.items() if t.thinking is not None}
    assert thinking == {"qwen3", "deepseekr1"}
    assert {n for n, tag in tags.items() if tag != ("", "")} == thinking
    assert tags["qwen3"] == ("<think>", "</think>")


def test_modelfile_round_trips_through_ollamas_parser(
    templates: dict[str, Template], tiny_tokenizer: Any
) -> None:
    for name in list_templates():
        t = get_template(name)
        text = modelfile_text(t, tiny_tokenizer)
        commands = gotmpl.parse_modelfile(text)
        bound = templates[name]
        want = [("from", "."), ("template", ollama_template(bound))]
        want += [("system", bound.default_system)] if bound.default_system else []
        want += [("stop", w) for w in dict.fromkeys((*bound.stop_words, bound.train_eos)) if w]
        assert commands == want, name
        assert text.startswith("# Ollama Modelfile for tunesmith chat template")


def test_modelfile_system_and_stops(tiny_tokenizer: Any) -> None:
    text = modelfile_text(get_template("qwen"), tiny_tokenizer, system='Answer in "one" line.\nBe kind.')
    commands = dict(gotmpl.parse_modelfile(text))
    assert commands["system"] == 'Answer in "one" line.\nBe kind.'
    assert [v for k, v in gotmpl.parse_modelfile(text) if k == "stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert "# Not translated: tool schemas and tool calls" in text
    assert "system" not in dict(
        gotmpl.parse_modelfile(modelfile_text(get_template("qwen"), tiny_tokenizer, system=""))
    )
    # glm4 trains the tokenizer's EOS after every answer (train_eos): it stops the Modelfile too
    glm = [
        v
        for k, v in gotmpl.parse_modelfile(modelfile_text(get_template("glm4"), tiny_tokenizer))
        if k == "stop"
    ]
    assert glm == ["<|user|>", "<|observation|>", "<|endoftext|>", tiny_tokenizer.eos_token]
    with pytest.raises(TunesmithError, match='holds """'):
        modelfile_text(get_template("chatml"), tiny_tokenizer, system='say """')
    with pytest.raises(TunesmithError, match="has no system prompt"):
        modelfile_text(get_template("gemma"), tiny_tokenizer, system="Be brief.")


def test_tricky_template_text_survives(tiny_tokenizer: Any, go_render: Any) -> None:
    """Template text that Go or the Modelfile would misread: {{, trailing {, quotes, backslashes, non-printables."""
    t = dataclasses.replace(
        get_template("chatml"),
        name="tricky */ name",
        bos='"""{',
        system='<sys "q"> \\n {{ .System }} {\n{content}\u2028\u00a0\r\t end """',
        user="{{user}}\n{content}{",
        assistant=dataclasses.replace(get_template("chatml").assistant, header="}}{\x01>", suffix="\x7f"),
        default_system="Dëfault \U000e0001 system",
    )
    go_template = ollama_template(t)
    conversations = [[U1], [SYS, U1, A1, U2], [U1, A2]]
    results = go_render([{"template": go_template, "messages": _ollama_request(m)} for m in conversations])
    for messages, result in zip(conversations, results):
        want = _expected(t, messages, "", None)
        assert result["text"] == want
        assert gotmpl.render_ollama(go_template, _ollama_request(messages)) == want
    with pytest.raises(TunesmithError, match="non-printable"):
        modelfile_text(
            t, tiny_tokenizer
        )  # its default system prompt holds U+E0001, which Ollama's parser drops
    text = modelfile_text(t, tiny_tokenizer, system="Fine.")
    assert dict(gotmpl.parse_modelfile(text))["template"] == go_template


@pytest.mark.parametrize(
    ("fixture", "name", "bos"),
    [
        ("llama-2-chat", "llama2", "<s>"),
        ("mistral-7b-instruct-v0.3", "mistral", "<s>"),
        ("qwen2.5-instruct", "qwen", ""),
    ],
)
def test_bos_the_runtime_adds_is_left_out(fixture: str, name: str, bos: str) -> None:
    """Ollama's runner puts BOS before the prompt when the tokenizer does: the TEMPLATE must not repeat it."""
    if not (HF_TOKENIZERS / fixture / "tokenizer_config.json").exists():
        pytest.skip(f"{HF_TOKENIZERS / fixture} not present")
    tokenizer = AutoTokenizer.from_pretrained(HF_TOKENIZERS / fixture)
    t = get_template(name).bind(tokenizer.bos_token, tokenizer.eos_token)
    go_template = dict(gotmpl.parse_modelfile(modelfile_text(t, tokenizer)))["template"]
    for messages in ([U1], [SYS, U1, A1, U2]):
        want = render(t, messages, add_generation_prompt=True).text
        assert want.startswith(bos)
        got = gotmpl.render_ollama(go_template, messages)
        assert bos + got == want
        assert not bos or not got.startswith(bos)


def test_strip_is_a_documented_deviation(templates: dict[str, Template], tiny_tokenizer: Any) -> None:
    """Go templates cannot trim: for ``strip`` roles only contents without surrounding whitespace are exact."""
    t = templates["llama3"]
    got = gotmpl.render_ollama(ollama_template(t), [PADDED])
    assert got != render(t, [PADDED], add_generation_prompt=True).text
    assert PADDED["content"] in got
    assert "# Not translated: tunesmith strips whitespace around system/user/assistant" in modelfile_text(
        get_template("llama3"), tiny_tokenizer
    )


def test_what_cannot_be_translated_is_refused(tiny_tokenizer: Any) -> None:
    with pytest.raises(NoOllamaTranslation, match="Set `template:`"):
        modelfile_text(AutoTemplate.from_tokenizer(tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(TunesmithError, match="eos_token"):
        ollama_template(get_template("alpaca"))  # unbound: {eos_token} comes from the tokenizer
