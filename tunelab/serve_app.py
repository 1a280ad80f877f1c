"""The FastAPI app of `tunelab serve` (tunelab/serve.py: the command, its options and model loading).

    from tunelab.serve_app import create_app
    app = create_app({"base": engine, "x": tuned}, api_key="KEY")   # then uvicorn.run(app) or TestClient(app)

Routes, errors and streaming as serve.py's docstring describes them; request and response shapes come from
tunelab/openai_api.py, answers from the engines (tunelab/engine.py). A separate module so that the command
parses its flags (and prints --help) without importing FastAPI, the engine or torch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from tunelab.engine import BadRequest, Busy, ChatEngine, Generation
from tunelab.errors import TunelabError
from tunelab.openai_api import (APIError, ChatRequest, Chunks, CompletionRequest, Sampling, chat_completion,
                                error_body, install_error_handlers, text_completion)

logger = logging.getLogger(__name__)

def create_app(engines: Mapping[str, ChatEngine] | ChatEngine, api_key: str | None = None,
               max_tokens_limit: int = 2048, max_request_bytes: int = 8 << 20) -> FastAPI:
    """The FastAPI app serving each engine under its id (a single engine: under `engine.name`)."""
    engines = {engines.name: engines} if isinstance(engines, ChatEngine) else dict(engines)
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    created = int(time.time())

    def check_key(request: Request) -> None:
        _check_key(request, api_key)

    def card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/health")
    async def health():
        schedulers = {id(e.scheduler): e.scheduler for e in engines.values()}.values()
        return {"status": "ok", "models": list(engines), "in_flight": sum(e.in_flight for e in engines.values()),
                "recent_batch_sizes": [n for s in schedulers for n in list(s.batch_sizes)[-8:]]}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [card(m) for m in engines]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        find_engine(engines, model_id)
        return card(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        engine = find_engine(engines, body.model)
        messages = [m.as_dict() for m in body.messages]
        gen = await start(engine, messages, body, max_tokens_limit)
        return await respond(gen, body, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        engine = find_engine(engines, body.model)
        gen = await start(engine, body.prompts(), body, max_tokens_limit)
        return await respond(gen, body, request, chat=False)

    return app


def _check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not secrets.compare_digest(header[7:].strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


def find_engine(engines: Mapping[str, ChatEngine], model: str) -> ChatEngine:
    if model not in engines:
        raise APIError(404, f"model '{model}' does not exist: this server serves {', '.join(map(repr, engines))}",
                       param="model", code="model_not_found")
    return engines[model]


def request_settings(body: Sampling, limit: int) -> dict[str, Any]:
    """Engine settings for a request; max_tokens is bounded by the server's limit."""
    max_tokens = body.token_limit()
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}, this server allows at most {limit}",
                       param="max_tokens", code="invalid_value")
    return {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "repetition_penalty": body.repetition_penalty, "seed": body.seed, "n": body.n, "stop": body.stop}


async def start(engine: ChatEngine, prompt, body: Sampling, limit: int) -> Generation:
    """Encode and queue a request in a worker thread (a huge prompt must not stall the event loop); the
    engine's refusals become 400s (503 when the queue is full) before any response starts."""
    settings = request_settings(body, limit)
    if settings["max_new_tokens"] is None:  # the server's own default, within the limit
        settings["max_new_tokens"] = min(engine.generation.max_new_tokens, limit)
    submit = engine.stream if isinstance(body, ChatRequest) else engine.complete
    try:
        return await anyio.to_thread.run_sync(lambda: submit(prompt, **settings))
    except BadRequest as err:
        raise APIError(400, str(err), param=err.param, code="invalid_value") from err
    except Busy as err:
        raise APIError(503, str(err), code="server_busy", kind="server_error") from err
    except TunelabError as err:  # e.g. two user messages in a row, an empty prompt
        raise APIError(400, str(err), param="messages" if isinstance(body, ChatRequest) else "prompt") from err


async def respond(gen: Generation, body: Sampling, request: Request, chat: bool):
    if body.stream:
        # background: cancels even when the client leaves before the stream's first event
        return EventSourceResponse(stream_events(gen, Chunks(body.model, chat), body.include_usage()),
                                   background=BackgroundTask(gen.cancel))
    if not await finished(gen, request):
        return Response(status_code=499)  # the client gave up; nobody reads this
    if gen.error is not None:
        logger.error("generation failed: %s", gen.error)
        raise APIError(500, f"generation failed: {gen.error}", kind="server_error")
    return (chat_completion if chat else text_completion)(body.model, gen)


def _wakeup(gen: Generation) -> asyncio.Event:
    """An event set (from the batch worker) whenever `gen` has news."""
    event, loop = asyncio.Event(), asyncio.get_running_loop()
    gen.listen(lambda: loop.call_soon_threadsafe(event.set))
    return event


async def finished(gen: Generation, request: Request, poll_s: float = 0.25) -> bool:
    """Wait for a non-streamed answer; False (and the generation cancelled) if the client disconnects."""
    news = _wakeup(gen)
    try:
        while not gen.done.is_set():
            with anyio.move_on_after(poll_s):
                await news.wait()
            news.clear()
            if not gen.done.is_set() and await request.is_disconnected():
                gen.cancel()
                return False
        return True
    finally:  # also when this task is cancelled (server shutdown)
        if not gen.done.is_set():
            gen.cancel()


async def stream_events(gen: Generation, chunks: Chunks, include_usage: bool):
    """SSE data: each choice's opening, its pieces as they come, finish reasons, [usage], [DONE].

    When the client goes away, sse-starlette cancels this generator; `finally` cancels the generation.
    """
    news = _wakeup(gen)
    try:
        for line in chunks.start(len(gen.replies)):
            yield line
        over = False
        while not over:
            news.clear()
            items, over = gen.take()
            for index, piece in items:
                yield chunks.piece(index, piece)
            if not items and not over:
                await news.wait()
        if gen.error is not None:
            raise gen.error
        for line in chunks.finish(gen, include_usage):
            yield line
    except Exception as err:  # the model failed mid-stream: tell the client in OpenAI's shape
        logger.exception("generation failed")
        yield json_error(f"generation failed: {err}")
    finally:
        gen.cancel()


def json_error(message: str) -> str:
    import json

    return json.dumps(error_body(message, "server_error"))


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with an OpenAI-shaped 413, whether its
    Content-Length says so up front or its (chunked) bytes run over while being read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            from fastapi.responses import JSONResponse

            response = JSONResponse(error_body(self._message(), "invalid_request_error"), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI passes an HTTPException raised while reading the body on
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body too large: at most {self.max_bytes / (1 << 20):g} MiB"
