"""Completions -> OpenAI responses: one ChatCompletion, or the SSE chunks of a stream ending in [DONE]."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.infer.api.errors import error_body
from tunesmith.infer.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    ResponseToolCall,
    StreamToolCall,
    Usage,
)
from tunesmith.infer.api.tool_calls import CallTags, StreamHold, parse_tool_calls, to_openai
from tunesmith.infer.engine import Completion, StreamEvent


def completion_response(
    rid: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completions: Sequence[Completion],
    tags: CallTags | None,
) -> ChatCompletion:
    """The response of a non-streaming request; with ``tags`` (tools on) calls become ``tool_calls``."""
    choices = []
    for i, c in enumerate(completions):
        content, calls = parse_tool_calls(c.text, tags) if tags else (c.text, [])
        message = ResponseMessage(content=(content or None) if calls else content)
        finish = c.finish_reason
        if calls:
            message.tool_calls = [ResponseToolCall.model_validate(d) for d in to_openai(calls)]
            finish = "tool_calls"
        choices.append(Choice(index=i, message=message, finish_reason=finish))
    generated = sum(c.completion_tokens for c in completions)
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
    )
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage)


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line: ``data: {...}``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chunks(
    events: AsyncIterator[StreamEvent],
    *,
    rid: str,
    created: int,
    model: str,
    tags: CallTags | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE chunks of one streamed answer: role, content pieces, tool calls, finish, usage, [DONE].

    With tools on, text from the first call tag on is held back and sent as ``tool_calls`` once the
    answer is complete (or as content when it turns out not to be a valid call).
    """

    def chunk(delta: Delta, finish: str | None = None) -> str:
        body = ChatCompletionChunk(
            id=rid, created=created, model=model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
        ).model_dump()
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        if not include_usage:
            body.pop("usage")
        return sse(body)

    yield chunk(Delta(role="assistant", content=""))
    hold = StreamHold(tags) if tags else None
    final: Completion | None = None
    try:
        async for event in events:
            final = event.completion or final
            text = hold.feed(event.text) if hold else event.text
            if text:
                yield chunk(Delta(content=text))
    except Exception as e:  # noqa: BLE001 - headers are sent: the error travels as an SSE event
        status = 400 if isinstance(e, TunesmithError) else 500
        yield sse(error_body(status, str(e) or type(e).__name__))
        yield sse("[DONE]")
        return
    assert final is not None, "the engine's stream ends with an event carrying the completion"
    finish = final.finish_reason
    if hold:
        rest, calls = hold.finish()
        if rest:
            yield chunk(Delta(content=rest))
        if calls:
            entries = [StreamToolCall(index=i, **d) for i, d in enumerate(to_openai(calls))]
            yield chunk(Delta(tool_calls=entries))
            finish = "tool_calls"
    yield chunk(Delta(), finish)
    if include_usage:
        usage = Usage(
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            total_tokens=final.prompt_tokens + final.completion_tokens,
        )
        yield sse(
            ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage).model_dump()
        )
    yield sse("[DONE]")


__all__ = ["completion_response", "sse", "stream_chunks"]
