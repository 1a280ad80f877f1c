"""`tunelab serve`: an OpenAI-compatible chat API for a base model plus tunelab checkpoints.

    tunelab serve --checkpoint_dir runs/x [--port 8000] [--api_key KEY | TUNELAB_API_KEY=KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints: POST /v1/chat/completions (plain, or `stream: true` server-sent events in OpenAI's chunk format
ending with `data: [DONE]`; `stream_options.include_usage` adds the usage chunk), GET /v1/models,
GET /v1/models/{id}, GET /health (no key needed; reports generations in flight).

The model id is --served_model_name (default: the checkpoint's folder name). Binds 127.0.0.1 unless
--host says otherwise. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for
a bad payload (also what FastAPI would answer 422), 401 for a missing or wrong key, 404 for an unknown
model. `max_tokens` above --max_tokens_limit is refused; without it the answer gets
min(--max_new_tokens, --max_tokens_limit) tokens. temperature 0 means greedy decoding; `repetition_penalty`
is accepted as an extension (as vLLM does). One model answers one request at a time: requests queue (see
tunelab/engine.py), and a client that disconnects mid-stream cancels its generation, freeing the model.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from tunelab.engine import ChatEngine, Generation, Reply, to_example
from tunelab.errors import TunelabError
from tunelab.hparams import _opt, listen_arguments, parse_with

logger = logging.getLogger(__name__)

API_KEY_ENV = "TUNELAB_API_KEY"


@dataclass
class ServeArguments(listen_arguments(8000)):
    api_key: str | None = _opt(None, f"Bearer key clients must send (default: ${API_KEY_ENV}; none: open).")
    max_tokens_limit: int = _opt(2048, "Largest max_tokens a request may ask for.")
    served_model_name: str | None = _opt(None, "Model id clients pass (default: the checkpoint's folder name).")


# ---- request body (pydantic validates; errors become OpenAI-shaped 400s) ----

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send more fields (user, metadata, ...)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    n: Literal[1] = 1
    stop: str | list[str] | None = None  # refused below unless empty: not supported
    stream: bool = False
    stream_options: StreamOptions | None = None


# ---- errors ----

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, err: APIError):
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException):  # unknown route, wrong method
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)


# ---- the app ----

def create_app(engine: ChatEngine, api_key: str | None = None, max_tokens_limit: int = 2048) -> FastAPI:
    """The FastAPI app serving `engine` as model `engine.name`."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    created = int(time.time())

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(header[7:].strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "in_flight": engine.in_flight}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_key)])
    async def model(model_id: str):
        check_model(engine, model_id)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest):
        check_model(engine, body.model)
        messages = [m.as_dict() for m in body.messages]
        settings = request_settings(body, engine, max_tokens_limit)
        gen = start(engine, messages, settings)  # errors are 400s here, not inside a started stream
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            # background: cancels even when the client leaves before the stream's first event
            return EventSourceResponse(stream_events(engine, gen, include_usage),
                                       background=BackgroundTask(gen.cancel))
        return completion(engine.name, await anyio.to_thread.run_sync(gen.result))

    return app


def check_model(engine: ChatEngine, model: str) -> None:
    if model != engine.name:
        raise APIError(404, f"model '{model}' does not exist: this server serves '{engine.name}'",
                       param="model", code="model_not_found")


def start(engine: ChatEngine, messages: list[dict], settings: dict[str, Any]) -> Generation:
    try:
        to_example(messages)
    except TunelabError as err:  # e.g. two user messages in a row
        raise APIError(400, str(err), param="messages") from err
    try:
        return engine.stream(messages, **settings)
    except TunelabError as err:
        raise APIError(400, str(err)) from err


def request_settings(body: ChatRequest, engine: ChatEngine, limit: int) -> dict[str, Any]:
    """Engine settings for a request; max_tokens is bounded by the server's limit."""
    if body.stop:
        raise APIError(400, "stop strings are not supported by tunelab serve", param="stop", code="unsupported")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens is {max_tokens}, this server allows at most {limit}",
                       param="max_tokens", code="invalid_value")
    return {"max_new_tokens": max_tokens or min(engine.generation.max_new_tokens, limit),
            "temperature": body.temperature, "top_p": body.top_p,
            "repetition_penalty": body.repetition_penalty, "seed": body.seed}


def completion(model: str, reply: Reply) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": reply.usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": _finish(reply), "logprobs": None}]}


def _finish(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


async def stream_events(engine: ChatEngine, gen: Generation, include_usage: bool):
    """OpenAI chunks as SSE data: role, content pieces, finish reason, [usage], [DONE].

    When the client goes away, sse-starlette cancels this generator; `finally` cancels the generation so
    the model is free for the next request (the thread reading the streamer is abandoned, not waited for).
    """
    import json

    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                           "model": engine.name, "choices": [choice], **extra}, ensure_ascii=False)

    pieces = iter(gen)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)) is not None:
            yield chunk({"content": piece})
        yield chunk({}, _finish(gen.reply))
        if include_usage:
            yield json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                              "model": engine.name, "choices": [], "usage": gen.reply.usage})
        yield "[DONE]"
    except Exception as err:  # the model failed mid-stream: tell the client in OpenAI's shape
        logger.exception("generation failed")
        yield json.dumps(error_body(f"generation failed: {err}", "server_error"))
    finally:
        gen.cancel()


def main(argv: list[str]) -> int:
    import uvicorn

    args, opts = parse_with(argv, ServeArguments, prog="tunelab serve")
    api_key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use the model",
                       opts.host)
    engine = ChatEngine.from_args(args, name=opts.served_model_name)
    app = create_app(engine, api_key, opts.max_tokens_limit)
    print(f"tunelab serve: model '{engine.name}' at http://{opts.host}:{opts.port}/v1", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info")
    return 0
