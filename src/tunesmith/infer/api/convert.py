"""A validated request -> what the engine takes: canonical messages, tools JSON text, SamplingSettings."""

from __future__ import annotations

import json

from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.infer.api.errors import ApiError
from tunesmith.infer.api.protocol import ChatCompletionRequest, ChatMessage, unsupported_fields
from tunesmith.infer.api.tool_calls import to_canonical
from tunesmith.infer.settings import SamplingSettings


def check_supported(req: ChatCompletionRequest) -> None:
    """400 naming the first field set to a meaning this server does not implement."""
    refused = unsupported_fields(req)
    if refused:
        field, why = refused[0]
        raise ApiError(400, f"{field}: {why}", field, "unsupported_parameter")


def to_messages(req: ChatCompletionRequest) -> list[Message]:
    """OpenAI messages as canonical ones (developer -> system; tool_calls parsed; text parts joined)."""
    return [_message(m, i) for i, m in enumerate(req.messages)]


def _message(m: ChatMessage, i: int) -> Message:
    where = f"messages.{i}"
    role = "system" if m.role == "developer" else m.role
    if m.tool_calls and role != "assistant":
        raise ApiError(
            400, f"{where}.tool_calls: only assistant messages carry tool calls", f"{where}.tool_calls"
        )
    content = _text(m, where)
    if content is None:
        if not m.tool_calls:
            raise ApiError(400, f"{where}.content: missing (only an assistant tool call may omit it)", where)
        content = ""
    msg = Message(role=role, content=content)
    if m.tool_calls:
        msg["tool_calls"] = [to_canonical(c.function.name, c.function.arguments) for c in m.tool_calls]
    if m.reasoning_content:
        msg["reasoning"] = m.reasoning_content
    return msg


def _text(m: ChatMessage, where: str) -> str | None:
    if not isinstance(m.content, list):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"{where}.content.{j}: part type {part.type!r} is not supported (text parts only)",
                f"{where}.content.{j}.type",
            )
        texts.append(part.text)
    return "".join(texts)


def tools_text(req: ChatCompletionRequest) -> str:
    """The tool schemas as JSON text for the template; "" without tools or with tool_choice 'none'.

    tool_choice 'none' leaves the tools out of the prompt (as vLLM does by default): the model then has no
    reason to write a call, and none is parsed from its answer.
    """
    if not req.tools or req.tool_choice == "none":
        return ""
    return json.dumps([t.model_dump(exclude_none=True) for t in req.tools], ensure_ascii=False)


def sampling(req: ChatCompletionRequest, base: SamplingSettings) -> SamplingSettings:
    """The server's settings with the request's values; a contradiction is a 400 naming it.

    A temperature above 0 asks for sampling (OpenAI's meaning) even when the server's default is greedy;
    temperature 0 asks for greedy decoding.
    """
    try:
        return base.with_overrides(
            do_sample=True if req.temperature else None,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=req.stop,
            n=req.n,
            max_new_tokens=req.max_completion_tokens or req.max_tokens,
        )
    except TunesmithError as e:
        raise ApiError(400, str(e), None, "invalid_request") from None


__all__ = ["check_supported", "sampling", "to_messages", "tools_text"]
