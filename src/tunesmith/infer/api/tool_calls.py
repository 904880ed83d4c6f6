"""Tool calls between the OpenAI protocol and our canonical messages, both ways.

The template's tool format (data/tools.py) says how a call is written, e.g. Qwen/Hermes
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; the tags around the JSON are read off
that format, so a new format needs no parser of its own.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tunesmith.data.templates import AutoTemplate, Template
from tunesmith.data.tools import TOOL_FORMATS, ToolFormat, arguments_text, get_tool_format
from tunesmith.data.types import ToolCall


@dataclass(frozen=True)
class CallTags:
    open: str
    close: str


def call_tags(fmt: ToolFormat) -> CallTags:
    """The text before a call's JSON object and after it, e.g. ('<tool_call>', '</tool_call>')."""
    head = fmt.call[: fmt.call.index("{")]
    tail = fmt.call[fmt.call.rindex("}") + 1 :]
    return CallTags(head.strip(), tail.strip())


def template_call_tags(template: Template | AutoTemplate) -> CallTags | None:
    """How the template's model writes a call: its tool format's tags; for ``template: auto``, the
    tags of the first known format whose opening tag the jinja template itself writes; else None."""
    if isinstance(template, Template):
        return call_tags(get_tool_format(template.tool_format)) if template.tool_format else None
    for fmt in TOOL_FORMATS.values():
        tags = call_tags(fmt)
        if tags.open in template.chat_template:
            return tags
    return None


def parse_tool_calls(text: str, tags: CallTags) -> tuple[str, list[ToolCall]]:
    """(content before the first call, the calls) of a generated answer.

    An answer whose tagged blocks are not all valid ``{"name", "arguments"}`` JSON is plain text: no
    calls, the whole text as content (a half-written call must not reach the client as a call).
    """
    start = text.find(tags.open)
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    rest = text[start:]
    while rest.strip():
        rest = rest.lstrip()
        if not rest.startswith(tags.open):
            return text, []
        body, found, rest = rest[len(tags.open) :].partition(tags.close)
        call = _call(body) if found else None
        if call is None:
            return text, []
        calls.append(call)
    return text[:start].rstrip(), calls


def _call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if not isinstance(args, (dict, str)):
        return None
    return ToolCall(name=value["name"], arguments=args)


def to_canonical(name: str, arguments: str) -> ToolCall:
    """An OpenAI call (arguments as JSON text) as a canonical ToolCall (arguments a dict when JSON)."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = None
    return ToolCall(name=name, arguments=parsed if isinstance(parsed, dict) else arguments)


def to_openai(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Canonical calls as OpenAI ``tool_calls`` entries with fresh ids."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": arguments_text(c["arguments"])},
        }
        for c in calls
    ]


@dataclass
class StreamHold:
    """Streamed text up to the first call tag; the rest is held until the answer is complete.

    ``feed`` returns the text that is safe to send as content now (never a tag or a prefix of one).
    """

    tags: CallTags
    text: str = ""
    sent: int = 0
    held: bool = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        at = self.text.find(self.tags.open, self.sent)
        if at >= 0:
            self.held = True
            ready = at
        else:
            ready = len(self.text) - _partial_suffix(self.text, self.tags.open)
        out, self.sent = self.text[self.sent : ready], max(self.sent, ready)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(unsent content, calls): the held text as calls when it parses, else as content."""
        content, calls = parse_tool_calls(self.text, self.tags)
        if calls:
            return content[self.sent :] if len(content) > self.sent else "", calls
        return self.text[self.sent :], []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


__all__ = [
    "CallTags",
    "StreamHold",
    "call_tags",
    "parse_tool_calls",
    "template_call_tags",
    "to_canonical",
    "to_openai",
]
