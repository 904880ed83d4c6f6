"""The FastAPI app: /v1/models, /v1/chat/completions (plain and SSE), /health; bearer auth on /v1.

    app = create_app(engine, SamplingSettings.from_config(cfg), api_key="sk-local")

Every request is validated and its prompt rendered in the handler (so a bad request is a 400 before
anything is queued); generation goes through the Batcher, the model's only user.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from tunesmith.infer.api.batcher import Batcher
from tunesmith.infer.api.convert import check_supported, sampling, to_messages, tools_text
from tunesmith.infer.api.errors import ApiError, install_error_handlers, validation_message
from tunesmith.infer.api.protocol import ChatCompletionRequest, ModelCard, ModelList
from tunesmith.infer.api.responses import completion_response, stream_chunks
from tunesmith.infer.api.tool_calls import template_call_tags
from tunesmith.infer.engine import Engine
from tunesmith.infer.settings import SamplingSettings


def create_app(
    engine: Engine, settings: SamplingSettings, api_key: str | None = None, *, max_batch: int = 32
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``; ``settings`` are the defaults requests override."""
    batcher = Batcher(engine, max_batch=max_batch)
    tags = template_call_tags(engine.template)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_bearer(api_key))])

    def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, **asdict(batcher.stats)}

    app.get("/health")(health)
    v1.get("/health")(health)

    @v1.get("/models")
    def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=engine.name, created=started)]).model_dump()

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        req = _parse(await request.body())
        check_supported(req)
        params = sampling(req, settings)
        tools = tools_text(req)
        if tools and tags is None:
            raise ApiError(
                400,
                "tools: the served template has no tool-call format the server can read back; serve with a "
                "template that has one (template: qwen, qwen3, qwen3_nothink)",
                "tools",
                "unsupported_parameter",
            )
        prompt = engine.prompt_ids(to_messages(req), tools=tools)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        reading = tags if tools else None
        if req.stream:
            chunks = stream_chunks(
                batcher.stream(prompt, params),
                rid=rid,
                created=created,
                model=engine.name,
                tags=reading,
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
            )
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        completions = await batcher.generate(prompt, params)
        body = completion_response(rid, created, engine.name, len(prompt), completions, reading)
        return JSONResponse(body.model_dump())

    app.include_router(v1)
    return app


def _parse(body: bytes) -> ChatCompletionRequest:
    """The request body as a ChatCompletionRequest; any problem is a 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise ApiError(400, message, param, "invalid_request") from None


def _bearer(api_key: str | None) -> Any:
    """A dependency that refuses requests without ``Authorization: Bearer <api_key>`` (none when unset)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key")

    return check


__all__ = ["create_app"]
