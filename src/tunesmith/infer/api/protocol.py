"""OpenAI chat.completions request and response models (the subset tunesmith serves).

Requests are validated strictly (no "2" for 2, unknown fields refused) so a client learns at once that a
parameter did nothing. OpenAI fields that cannot change the answer (``user``, ``metadata``, ...) are
accepted and ignored; fields whose meaning tunesmith does not implement are refused by
``unsupported_fields`` with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # completions per request: each one is a full generation in the batch
MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Lenient):
    type: str  # only "text" is served; others are refused by name when converting
    text: str | None = None


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallIn(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    """One message of the request history (``name`` and other extras are ignored)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: dict[str, Any]


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str = ""  # any name is accepted: one model is served (GET /v1/models names it)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the model decides how many calls it writes
    # vLLM-style extensions (sent by clients through extra_body)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    # Accepted and ignored: they do not change the generated answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Accepted only at their neutral value (see unsupported_fields).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None


def unsupported_fields(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, why) for every field set to a meaning tunesmith does not implement."""
    out: list[tuple[str, str]] = []
    if req.logprobs or req.top_logprobs:
        out.append(("logprobs", "log probabilities are not returned by this server"))
    for name, penalty in (
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
    ):
        if penalty:
            out.append((name, "not supported; use repetition_penalty (a vLLM-style extension) instead"))
    if req.logit_bias:
        out.append(("logit_bias", "not supported"))
    if req.response_format and req.response_format.get("type") != "text":
        out.append(("response_format", "only {'type': 'text'} is supported (no JSON mode or schemas)"))
    if req.modalities and req.modalities != ["text"]:
        out.append(("modalities", "only ['text'] is supported"))
    if req.functions or req.function_call:
        out.append(("functions", "the deprecated functions API is not supported; use tools"))
    others = {
        "audio": req.audio,
        "prediction": req.prediction,
        "web_search_options": req.web_search_options,
        "reasoning_effort": req.reasoning_effort,
    }
    out += [(name, "not supported") for name, value in others.items() if value is not None]
    if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
        out.append(("tool_choice", "only 'auto' and 'none' are supported (calls cannot be forced)"))
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        out.append(("stop", f"at most {MAX_STOP} stop sequences"))
    if req.stream and req.n > 1:
        out.append(("n", "streaming gives one answer per request; use n=1 or stream=false"))
    return out


# ---- responses -------------------------------------------------------------------------------------


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class StreamToolCall(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[StreamToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunesmith"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "ContentPart",
    "ChunkChoice",
    "Delta",
    "ModelCard",
    "ModelList",
    "ResponseFunction",
    "ResponseMessage",
    "ResponseToolCall",
    "StreamToolCall",
    "Usage",
    "unsupported_fields",
]
