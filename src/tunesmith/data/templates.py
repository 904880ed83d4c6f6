"""Chat templates as data: a registry built from ``templates/*.yaml`` and one generic renderer.

The renderer records each message's character span while it renders, so masks come from structure
(see docs/templates.md for the YAML schema and the span rules). ``template: auto`` (the tokenizer's own
jinja template) lives in templates_auto.py and has the same ``render`` contract.

    >>> t = get_template("qwen")
    >>> r = render(t, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    >>> [r.text[s.start : s.end] for s in r.spans if s.supervise]
    ['Hello<|im_end|>']

A template's ``train_eos`` (the GLM family) ends training samples only: ``with_train_eos`` appends it to
a rendered training conversation; ``render`` (prompts, inference, exported templates) never writes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunesmith.data.templates_auto import AutoTemplate, compare_with_tokenizer
from tunesmith.data.tools import calls_text, fill, get_tool_format, with_tools
from tunesmith.data.types import Message, Rendered, Role, Span
from tunesmith.errors import TunesmithError

__all__ = [
    "AutoTemplate",
    "Template",
    "compare_with_tokenizer",
    "get_template",
    "list_templates",
    "render",
    "resolve_template",
    "with_train_eos",
]

TEMPLATE_DIR = Path(__file__).with_name("templates")
TOKEN_PLACEHOLDERS = ("{bos_token}", "{eos_token}")  # filled from the tokenizer by bind()


# The YAML schema is these dataclasses: a field without a default is required (docs/templates.md).
@dataclass(frozen=True)
class AssistantFormat:
    body: str  # supervised: "{content}" plus the end-of-turn text the model must learn to emit
    header: str = ""  # not supervised (e.g. "<|im_start|>assistant\n")
    suffix: str = ""  # not supervised (e.g. the "\n" after "<|im_end|>")


@dataclass(frozen=True)
class ToolTurn:
    format: str  # one tool result, "{content}"
    group_prefix: str = ""  # once before a run of consecutive tool results
    group_suffix: str = ""  # once after it


@dataclass(frozen=True)
class Thinking:
    open: str  # e.g. "<think>\n"
    close: str  # e.g. "\n</think>\n\n"
    scope: Literal["all", "after_last_user"] = "after_last_user"  # which answers keep their reasoning
    empty_on_final: bool = False  # the final answer gets an empty block when it has no reasoning


@dataclass(frozen=True)
class Template:
    """One chat template, as read from a YAML file (docs/templates.md describes every field)."""

    name: str
    user: str
    assistant: AssistantFormat
    eos: str  # the end-of-turn text an assistant turn ends with (generation stops on it)
    stop_words: tuple[str, ...] = ()  # every string that ends generation; eos first
    # Appended, supervised, after the final assistant turn of a training sample only (LLaMA-Factory's
    # efficient_eos): for models whose turns end with the NEXT turn's role token, so that the final
    # answer still ends with a learned stop token. Usually "{eos_token}"; generation also stops on it.
    train_eos: str = ""
    default_system: str = ""
    system: str = ""
    system_placement: Literal["own_turn", "first_user", "last_user", "unsupported"] = "own_turn"
    always_system: bool = False
    bos: str = ""
    generation_prompt: str = ""  # a YAML file that leaves it out gets assistant.header
    end_of_conversation: str = ""
    strip: tuple[Role, ...] = ()
    tool: ToolTurn | None = None
    tool_format: str = ""
    thinking: Thinking | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    compare_kwargs: tuple[tuple[str, Any], ...] = ()  # jinja variables for compare_with_tokenizer
    source: str = ""  # the YAML file it came from

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: str = "",
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> Rendered:
        """See the module-level ``render``."""
        return _render(self, messages, tools, add_generation_prompt, enable_thinking)

    @functools.cached_property
    def unbound_placeholders(self) -> tuple[str, ...]:
        """The tokenizer placeholders that rendering still needs filled (bind() fills them).

        ``train_eos`` is left out: ``render`` never writes it (``with_train_eos`` checks it itself).
        """
        text = _all_text(self, skip=("train_eos",))
        return tuple(p for p in TOKEN_PLACEHOLDERS if p in text)

    def bind(self, bos_token: str | None, eos_token: str | None) -> Template:
        """This template with ``{bos_token}`` / ``{eos_token}`` replaced by the tokenizer's tokens."""
        values = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        for key in values:
            if "{" + key + "}" in _all_text(self) and not values[key]:
                raise TunesmithError(
                    f"template {self.name!r} uses {{{key}}} but the tokenizer has no {key}; "
                    "set it on the tokenizer or pick a template that spells its tokens out"
                )
        return _map_strings(self, lambda s: fill(s, **values))


def render(
    template: Template | AutoTemplate,
    messages: Sequence[Message],
    *,
    tools: str = "",
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
) -> Rendered:
    """Render a conversation to text with contiguous spans, one or three per message.

    ``tools`` is the JSON text of the tool schemas. ``enable_thinking`` (templates with thinking tags):
    None/True trains the thinking block; False drops reasoning and puts the empty block in the prompt.
    """
    return template.render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )


def with_train_eos(
    template: Template | AutoTemplate, rendered: Rendered, messages: Sequence[Message]
) -> Rendered:
    """A rendered training conversation with the template's ``train_eos`` appended at its very end.

    The text is part of the final assistant message (supervised unless that message has ``train: false``),
    so masking, loss weights and truncation treat it as the end of the response. Once per sample, like
    LLaMA-Factory's ``efficient_eos``: earlier answers end with the next turn's role token, as at inference.
    Conversations that do not end with an assistant turn (prompts) and templates without it are unchanged.
    """
    if not isinstance(template, Template) or not template.train_eos:
        return rendered
    if not messages or messages[-1]["role"] != "assistant":
        return rendered
    missing = [p for p in TOKEN_PLACEHOLDERS if p in template.train_eos]
    if missing:
        raise TunesmithError(
            f"template {template.name!r}: train_eos {template.train_eos!r} uses {', '.join(missing)}, which "
            "come from the tokenizer: get the template with resolve_template(name, tokenizer) (or Template.bind)"
        )
    start, last = len(rendered.text), len(messages) - 1
    span = Span(start, start + len(template.train_eos), last, messages[last].get("train", True) is not False)
    return Rendered(rendered.text + template.train_eos, (*rendered.spans, span))


def list_templates() -> list[str]:
    """The names of the built-in templates, sorted."""
    return sorted(_builtin())


def get_template(name_or_path: str) -> Template:
    """A built-in template by name or alias, or the one template of a user YAML file."""
    from tunesmith.data.template_files import load_template_file

    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        templates = load_template_file(Path(name_or_path))
        if len(templates) != 1:
            raise TunesmithError(
                f"{name_or_path}: a user template file must define exactly one template; "
                f"it defines {len(templates)}: {', '.join(templates) or 'none'}"
            )
        return next(iter(templates.values()))
    builtin = _builtin()
    index = {_key(n): t for n, t in builtin.items()} | {
        _key(a): t for t in builtin.values() for a in t.aliases
    }
    if _key(name_or_path) in index:
        return index[_key(name_or_path)]
    close = difflib.get_close_matches(_key(name_or_path), list(index), n=4, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise TunesmithError(
        f"unknown chat template {name_or_path!r}. {hint}Use 'auto' (the tokenizer's own template), "
        f"a path to a template YAML file, or one of: {', '.join(sorted(builtin))}"
    )


def resolve_template(name: str, tokenizer: Any) -> Template | AutoTemplate:
    """``auto`` -> the tokenizer's jinja template; otherwise the named template bound to its tokens."""
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TunesmithError(
                "template: auto needs the tokenizer's chat_template, but this tokenizer has none (a base "
                "model?). Set `template:` to a named template, e.g. chatml, llama3, qwen, alpaca, empty; "
                f"all: {', '.join(list_templates())}"
            )
        return AutoTemplate.from_tokenizer(tokenizer)
    return get_template(name).bind(tokenizer.bos_token, tokenizer.eos_token)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _all_text(t: Template, skip: tuple[str, ...] = ()) -> str:
    parts: list[str] = []
    _map_strings(dataclasses.replace(t, **{name: "" for name in skip}), lambda s: parts.append(s) or s)
    return "\0".join(parts)


def _map_strings(obj: Any, fn: Any) -> Any:
    """A copy of a (nested) frozen dataclass with ``fn`` applied to every rendered string field."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("name", "aliases", "description", "source", "compare_kwargs"):
            continue
        if isinstance(value, str):
            changes[f.name] = fn(value)
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            changes[f.name] = tuple(fn(v) for v in value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _map_strings(value, fn)
    return dataclasses.replace(obj, **changes)


# --- loading -------------------------------------------------------------------------------------


@functools.cache
def _builtin() -> dict[str, Template]:
    # Cached because the files are read-only package data; every name must be unique across files.
    from tunesmith.data.template_files import load_template_file

    out: dict[str, Template] = {}
    for path in sorted(TEMPLATE_DIR.glob("*.yaml")):
        for name, template in load_template_file(path).items():
            if name in out:
                raise TunesmithError(f"{path}: template {name!r} is also defined in {out[name].source}")
            out[name] = template
    return out


# --- rendering ------------------------------------------------------------------------------------


@dataclass
class _Out:
    """Text pieces and their spans, appended in order."""

    pieces: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    length: int = 0

    def add(self, text: str, message: int, supervise: bool = False) -> None:
        if text:
            self.pieces.append(text)
            self.spans.append(Span(self.length, self.length + len(text), message, supervise))
            self.length += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.pieces), tuple(self.spans))


def _render(
    t: Template,
    messages: Sequence[Message],
    tools: str,
    add_generation_prompt: bool,
    enable_thinking: bool | None,
) -> Rendered:
    _check_bound(t)
    _check_messages(t, messages, tools)
    out = _Out()
    out.add(t.bos, -1)
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = _content(t, messages[0]) if has_system else t.default_system
    if tools:
        system = with_tools(get_tool_format(t.tool_format), system, tools)
    fold_into, fold_text = -1, ""
    if has_system or system or t.always_system:
        if t.system_placement == "unsupported":
            raise TunesmithError(
                f"template {t.name!r} has no system prompt (its official template does not accept one), but the "
                "conversation has a system message or tools. Remove the system prompt / tools, or pick a template "
                "that folds it into a user turn (e.g. gemma3, llama2, mistral)"
            )
        if t.system_placement == "own_turn":
            out.add(fill(t.system, content=system), 0 if has_system else -1)
        else:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise TunesmithError(
                    f"template {t.name!r} puts the system prompt into a user turn, but the "
                    "conversation has no user message"
                )
            fold_into = users[0] if t.system_placement == "first_user" else users[-1]
            fold_text = fill(t.system, content=system)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i > 0 or role == "user":
            text = (fold_text if i == fold_into else "") + _content(t, m)
            out.add(fill(t.user if role == "user" else t.system, content=text), i)
        elif role == "assistant":
            _render_assistant(t, messages, i, i > last_user or _scope_all(t), enable_thinking, out)
        elif role == "tool":
            assert t.tool is not None  # checked in _check_messages
            first = i == 0 or messages[i - 1]["role"] != "tool"
            last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
            text = fill(t.tool.format, content=_content(t, m))
            out.add((t.tool.group_prefix if first else "") + text + (t.tool.group_suffix if last else ""), i)
    if add_generation_prompt:
        # Thinking off: the empty block a trained final answer would have in its header (Qwen3's official prompt).
        off = t.thinking is not None and t.thinking.empty_on_final and enable_thinking is False
        empty = t.thinking.open + t.thinking.close if t.thinking and off else ""
        out.add(t.generation_prompt + empty, -1)
    else:
        out.add(t.end_of_conversation, -1)
    return out.done()


def _scope_all(t: Template) -> bool:
    return t.thinking is not None and t.thinking.scope == "all"


def _render_assistant(
    t: Template,
    messages: Sequence[Message],
    i: int,
    keeps_reasoning: bool,
    enable_thinking: bool | None,
    out: _Out,
) -> None:
    m = messages[i]
    content, reasoning = _content(t, m), m.get("reasoning")
    header = t.assistant.header
    if t.thinking is not None and reasoning is None:
        content, reasoning = _split_reasoning(t.thinking, content)
    if m.get("tool_calls"):  # before the thinking block: the separator depends on the answer text alone
        content = calls_text(get_tool_format(t.tool_format), content, m["tool_calls"])
    if t.thinking is not None:
        if enable_thinking is False:
            reasoning = ""  # a non-thinking answer: reasoning is dropped, as LLaMA-Factory does
        final = i == len(messages) - 1
        if keeps_reasoning and (reasoning or (final and t.thinking.empty_on_final)):
            block = t.thinking.open + reasoning.strip("\n") + t.thinking.close
            content = content.lstrip("\n")
            if enable_thinking is False:
                header += block  # the (empty) block is prompt, as in the official generation prompt
            else:
                content = block + content
    out.add(header, i)
    out.add(fill(t.assistant.body, content=content), i, supervise=m.get("train", True) is not False)
    out.add(t.assistant.suffix, i)


def _split_reasoning(thinking: Thinking, content: str) -> tuple[str, str]:
    """(content, reasoning) of an answer that embeds its reasoning, as the official Qwen3 template does."""
    close, open_ = thinking.close.strip(), thinking.open.strip()
    if close not in content:
        return content, ""
    before, _, after = content.rpartition(close)
    return after.lstrip("\n"), before.rstrip("\n").split(open_)[-1].lstrip("\n")


def _content(t: Template, m: Message) -> str:
    return m["content"].strip() if m["role"] in t.strip else m["content"]


def _check_bound(t: Template) -> None:
    missing = t.unbound_placeholders
    if missing:
        raise TunesmithError(
            f"template {t.name!r} uses {', '.join(missing)}, which come from the tokenizer: "
            "get it with resolve_template(name, tokenizer) (or Template.bind) before rendering"
        )


def _check_messages(t: Template, messages: Sequence[Message], tools: str) -> None:
    if tools and not t.tool_format:
        raise TunesmithError(
            f"template {t.name!r} has no tool format, but tools were given; use a template "
            "with one (qwen, qwen3, qwen3_nothink) or drop the tools column"
        )
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise TunesmithError(
                f"message {i}: unknown role {role!r}; expected system, user, assistant or tool"
            )
        if not isinstance(m.get("content"), str):
            raise TunesmithError(
                f"message {i} ({role}): content must be a string, got {type(m.get('content')).__name__}"
            )
        if role == "system" and i > 0 and t.system_placement != "own_turn":
            raise TunesmithError(
                f"message {i}: template {t.name!r} accepts a system message only as the first message"
            )
        if role == "tool" and t.tool is None:
            raise TunesmithError(
                f"message {i}: template {t.name!r} cannot render tool results; use a template with "
                "a tool turn (qwen, qwen3, qwen3_nothink)"
            )
        if m.get("tool_calls") and (role != "assistant" or not t.tool_format):
            raise TunesmithError(
                f"message {i}: tool_calls need an assistant message and a template with a tool "
                f"format; template {t.name!r} has {t.tool_format or 'none'}"
            )
        if m.get("reasoning") and t.thinking is None:
            raise TunesmithError(
                f"message {i}: has reasoning, but template {t.name!r} has no thinking tags; use a "
                "reasoning template (qwen3, deepseekr1) or drop the reasoning column"
            )
