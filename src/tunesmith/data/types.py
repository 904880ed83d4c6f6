"""The contracts between the data layers, as plain typed dicts and dataclasses.

readers  -> Record      (a raw dict from a file, with its Location)
formats  -> Row         (canonical, format-independent; OpenAI-style messages)
templates-> Rendered    (text + character spans per message, recorded while rendering)
encode   -> Encoded     (token ids + the span each token belongs to)
preprocess -> dict[str, list[int]] per stage (input_ids, labels, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from tunesmith.errors import Location

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(TypedDict):
    name: str
    arguments: dict[str, Any] | str  # a dict when the data held valid JSON, the raw string otherwise


class Message(TypedDict, total=False):
    role: Role  # required
    content: str  # required; always a str (numbers and objects canonicalised by formats)
    tool_calls: list[ToolCall]  # assistant turns that call tools
    reasoning: str  # assistant "thinking" text, rendered between the template's thinking tags
    train: bool  # openai format: False excludes this assistant turn from the loss
    weight: float  # openai format: loss weight of this assistant turn (default 1.0)


class Row(TypedDict, total=False):
    """One canonical sample. Which keys are set depends on the dataset kind.

    - sft / prompt-only: ``messages`` (sft ends with an assistant turn)
    - ranking (rm, dpo): ``messages`` is the shared prompt; ``chosen`` / ``rejected`` assistant turns
    - kto: ``messages`` ends with the assistant turn; ``kto_tag`` says desirable (True) or not
    - pt: ``text``
    """

    messages: list[Message]
    chosen: Message
    rejected: Message
    kto_tag: bool
    system: str  # system prompt given by a column (also present as messages[0] when set)
    tools: str  # JSON text of the tool schemas, "" when none
    text: str
    extra: dict[str, Any]  # user columns passed through untouched (reference answers, ids, ...)
    source: str  # str(Location) of the record, for error messages


@dataclass(frozen=True, slots=True)
class Record:
    """A raw record from a reader."""

    data: dict[str, Any]
    where: Location


@dataclass(frozen=True, slots=True)
class Span:
    """A character range of rendered text.

    ``message`` indexes the conversation's messages (-1: text of no message, e.g. BOS or the final
    generation prompt). ``supervise`` is True only for an assistant turn's body: its content and the
    template's end-of-turn text (EOS / stop word) that the model must learn to emit.
    """

    start: int
    end: int
    message: int
    supervise: bool


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: tuple[Span, ...]  # contiguous, in order, covering text exactly


@dataclass(slots=True)
class Encoded:
    """Token ids of a Rendered text and, per token, the index into Rendered.spans it starts in."""

    input_ids: list[int]
    token_span: list[int]
    spans: tuple[Span, ...] = field(default_factory=tuple)
