"""``template: auto``: the tokenizer's own jinja chat template, with spans from rendering prefixes.

Jinja output carries no structure, so spans come from rendering prefixes of the conversation: message i
ends where ``messages[:i+1]`` (no generation prompt) ends, and an assistant turn's supervised body starts
where ``messages[:i]`` with the generation prompt ends. Every prefix rendering must be a prefix of the
full text; templates that rewrite earlier turns when later ones arrive (Qwen3 drops old reasoning,
Mistral v0.3 moves the system prompt into the last user turn) are refused with a clear error.

Two rules keep these spans equal to a named template's: trailing whitespace after an assistant turn's
end-of-turn text is not supervised (like the named templates' ``suffix``), and a template that closes a
conversation rendered without a generation prompt with the eos token (Phi-3, Phi-4-mini) has that
closing eos treated as text of no message. Text before the first message's boundary (a BOS) belongs to
message 0. Rendering costs one jinja call per message plus one per assistant turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunesmith.data.tools import parse_tools
from tunesmith.data.types import Message, Rendered, Span
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    from tunesmith.data.templates import Template


@dataclass(frozen=True)
class AutoTemplate:
    """A jinja chat template (usually ``tokenizer.chat_template``) behind the ``render`` contract."""

    chat_template: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ... as the template sees them
    name: str = "auto"
    default_system: str = ""  # whatever the jinja template does on its own

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> AutoTemplate:
        """The tokenizer's default chat template and special tokens (as apply_chat_template passes them)."""
        tokens = tuple((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str))
        return cls(tokenizer.get_chat_template(), tokens)

    @property
    def eos(self) -> str:
        return dict(self.special_tokens).get("eos_token", "")

    @property
    def stop_words(self) -> tuple[str, ...]:
        return (self.eos,) if self.eos else ()

    def render_text(
        self,
        messages: Sequence[Message],
        *,
        tools: str = "",
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
        **variables: Any,
    ) -> str:
        """The jinja template's text for ``messages``, exactly as ``apply_chat_template(tokenize=False)``."""
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = dict(self.special_tokens) | variables
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        try:
            texts, _ = render_jinja_template(
                conversations=[[_hf_message(m) for m in messages]],
                tools=parse_tools(tools) or None,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except TemplateError as exc:
            raise TunesmithError(
                f"the chat template ({self.name}) rejected this conversation: {exc}"
            ) from None
        return texts[0]

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: str = "",
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> Rendered:
        """Text from the jinja template; spans from prefix renderings (see the module docstring)."""

        def text(prefix: Sequence[Message], gen: bool) -> str:
            return self.render_text(
                prefix, tools=tools, add_generation_prompt=gen, enable_thinking=enable_thinking
            )

        full = text(messages, add_generation_prompt)
        n, eos = len(messages), self.eos
        closes_with_eos = False
        ends: list[int | None] = []
        for i in range(n):
            if i == n - 1 and not add_generation_prompt:
                ends.append(len(full))
                continue
            prefix = text(messages[: i + 1], False)
            if full.startswith(prefix):
                ends.append(len(prefix))
            elif eos and prefix.endswith(eos) and full.startswith(prefix[: -len(eos)]):
                closes_with_eos = True
                ends.append(len(prefix) - len(eos))
            elif i < n - 1 and "assistant" not in (messages[i]["role"], messages[i + 1]["role"]):
                # No boundary needed between two prompt messages (e.g. grouped tool results, whose
                # turn closes only after the last one): they share one unsupervised span.
                ends.append(None)
            else:
                raise _inconsistent(i, prefix, full)
        if closes_with_eos and not add_generation_prompt and full.endswith(eos):
            ends[-1] = len(full) - len(eos)
        spans: list[Span] = []
        start, owner = 0, -1
        for i, m in enumerate(messages):
            end = ends[i]
            owner = i if owner < 0 else owner
            if end is None:
                continue
            if end < start:
                raise _inconsistent(i, full[:end], full)
            if m["role"] == "assistant":
                head = text(messages[:i], True) if i > 0 else ""
                if not full.startswith(head) or not start <= len(head) <= end:
                    raise _inconsistent(i, head, full)
                body_end = len(head) + len(full[len(head) : end].rstrip())
                _add(spans, start, len(head), i, False)
                _add(spans, len(head), body_end, i, m.get("train", True) is not False)
                _add(spans, body_end, end, i, False)
            else:
                _add(spans, start, end, owner, False)
            start, owner = end, -1
        _add(spans, start, len(full), -1, False)
        return Rendered(full, tuple(spans))


def _add(spans: list[Span], start: int, end: int, message: int, supervise: bool) -> None:
    if end > start:
        spans.append(Span(start, end, message, supervise))


def _inconsistent(i: int, prefix: str, full: str) -> TunesmithError:
    at = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    return TunesmithError(
        f"template: auto: the tokenizer's chat template is not prefix-consistent: rendering the conversation up "
        f"to message {i} gives text that is not the start of the full rendering (they differ at char {at}: "
        f"{prefix[at : at + 40]!r} vs {full[at : at + 40]!r}), so message spans cannot be recovered. This "
        "template rewrites earlier turns (e.g. drops old reasoning or moves the system prompt); set `template:` "
        "to a named template for this model (list_templates(), docs/templates.md)"
    )


def _hf_message(m: Message) -> dict[str, Any]:
    """A canonical message in the shape chat templates read (OpenAI tool calls, ``reasoning_content``)."""
    out: dict[str, Any] = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in m["tool_calls"]
        ]
    if "reasoning" in m:
        out["reasoning_content"] = m["reasoning"]
    return out


# --- comparing a named template with the tokenizer's own ----------------------------------------

_U1: Message = {"role": "user", "content": "Hi there!"}
_A1: Message = {"role": "assistant", "content": "Hello! How can I help?"}
_U2: Message = {"role": "user", "content": "Write one line\nabout {braces} and naïve café."}
_A2: Message = {"role": "assistant", "content": "Sure:\n  {braces} are fine."}
_SYS: Message = {"role": "system", "content": "You are a careful assistant."}
_TOOLS = (
    '[{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}]'
)
_CALL: Message = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
}
_RESULT: Message = {"role": "tool", "content": '{"temp_c": 21}'}

# (label, messages, add_generation_prompt): what `tunesmith check` compares.
STANDARD_CONVERSATIONS: tuple[tuple[str, list[Message], bool], ...] = (
    ("single turn", [_U1, _A1], False),
    ("multi turn", [_U1, _A1, _U2, _A2], False),
    ("system + multi turn", [_SYS, _U1, _A1, _U2, _A2], False),
    ("prompt with generation prompt", [_U1], True),
    ("system + history with generation prompt", [_SYS, _U1, _A1, _U2], True),
)


def compare_with_tokenizer(template: Template, tokenizer: Any) -> list[str]:
    """Differences between ``template`` and the tokenizer's chat template on standard conversations.

    [] when every case renders to the same text (the same text tokenized whole gives the same ids).
    Cases the tokenizer's template itself rejects (e.g. Gemma's system role) are skipped.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat_template, so there is nothing to compare against"]
    official = AutoTemplate.from_tokenizer(tokenizer)
    ours_t = template.bind(tokenizer.bos_token, tokenizer.eos_token)
    cases: list[tuple[str, list[Message], bool, str, bool | None]] = [
        (*c, "", None) for c in STANDARD_CONVERSATIONS
    ]
    if template.tool_format:
        cases.append(("tool call and result", [_U1, _CALL, _RESULT, _RESULT, _A1], False, _TOOLS, None))
    if template.thinking is not None:
        cases.append(("thinking off, generation prompt", [_U1], True, "", False))
        cases.append(
            ("reasoning in the final turn", [_U1, {**_A1, "reasoning": "Greet back."}], False, "", None)
        )
    out = []
    for label, messages, gen, tools, thinking in cases:
        try:
            theirs = official.render_text(
                messages,
                tools=tools,
                add_generation_prompt=gen,
                enable_thinking=thinking,
                **dict(template.compare_kwargs),
            )
        except TunesmithError:
            continue
        try:
            ours = ours_t.render(
                messages, tools=tools, add_generation_prompt=gen, enable_thinking=thinking
            ).text
        except TunesmithError as exc:
            out.append(f"{label}: the tokenizer's template renders it but {template.name!r} refuses: {exc}")
            continue
        if ours != theirs:
            at = next(
                (k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
            )
            out.append(
                f"{label} (add_generation_prompt={gen}): text differs at char {at}: "
                f"{template.name!r} has {ours[max(0, at - 20) : at + 30]!r}, "
                f"the tokenizer has {theirs[max(0, at - 20) : at + 30]!r}"
            )
    return out
