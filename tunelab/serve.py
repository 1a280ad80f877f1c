"""`tunelab serve`: an OpenAI-compatible API for a base model and tunelab checkpoints, requests batched.

    tunelab serve --checkpoint_dir runs/x [--also_serve runs/y,runs/z] [--port 8000] [--api_key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], stream=True)
    client.chat.completions.create(model="base", messages=..., n=3, temperature=0.8, stop=["\\n\\n"])
    client.completions.create(model="x", prompt="Once upon a time", max_tokens=32)

Models: every model loaded is addressable by `model`: `base` (the base model alone, prompts formatted as
the first checkpoint's run formats them; --serve_base false leaves it out), the --checkpoint_dir model
(id: --served_model_name, default its run name: the folder, or `run/checkpoint-N`), and each of
--also_serve (its run name). GET /v1/models lists them; an unknown id is a 404.

Endpoints: POST /v1/chat/completions and POST /v1/completions (plain, or `stream: true` server-sent events in
OpenAI's chunk format ending with `data: [DONE]`; `stream_options.include_usage` adds a usage chunk),
GET /v1/models, GET /v1/models/{id}, GET /health (no key needed: requests in flight, recent batch sizes).
`stop` (a string or a list) cuts the answer before the first stop string (finish_reason "stop"); `n` > 1
returns n sampled choices and is refused (400) when decoding is greedy (temperature 0, or no temperature
with a greedy server). temperature 0 means greedy; `repetition_penalty` is accepted as an extension.
Chat message content is encoded as text: a typed `<|im_start|>` is not a control token (safe_prompt.py).
A completions prompt is the model's raw input (its special tokens are the caller's to write).

Concurrency (tunelab/batching.py): requests arriving within --batch_window_ms of each other, for the same
model and decoding settings, generate in one batch of up to --max_batch_size answers; at most --max_queue
answers wait (more: 503). A client that disconnects, streaming or not, cancels its generation at the next
token. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad payload (also
what FastAPI would answer 422), 401 key, 404 model, 413 body over --max_request_mb, 503 busy.
Binds 127.0.0.1 unless --host says otherwise (elsewhere without a key: a warning).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from tunelab.engine import BadRequest, Busy, ChatEngine, Generation, Scheduler
from tunelab.errors import TunelabError
from tunelab.hparams import Args, _opt, listen_arguments, parse_with
from tunelab.openai_api import (APIError, ChatRequest, Chunks, CompletionRequest, Sampling, chat_completion,
                                error_body, install_error_handlers, text_completion)

logger = logging.getLogger(__name__)

API_KEY_ENV = "TUNELAB_API_KEY"
BASE_ID = "base"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeArguments(listen_arguments(8000)):
    api_key: str | None = _opt(None, f"Bearer key clients must send (default: ${API_KEY_ENV}; none: open).")
    max_tokens_limit: int = _opt(2048, "Largest max_tokens a request may ask for.")
    served_model_name: str | None = _opt(None, "Model id of the --checkpoint_dir model (default: its run name).")
    also_serve: str | None = _opt(None, "More checkpoints to serve side by side, comma-separated; each is its own "
                                  "model id (its run name) and its own copy of the weights.")
    serve_base: bool = _opt(True, f"Also serve the base model alone as model '{BASE_ID}' (one more copy of the "
                            "weights when a checkpoint is given).")
    max_batch_size: int = _opt(8, "Most answers generated together in one batch.")
    batch_window_ms: float = _opt(20.0, "How long a request waits for others to batch with when the model is idle.")
    max_queue: int = _opt(64, "Most answers waiting for the model; more requests get 503 (busy).")
    max_request_mb: float = _opt(8.0, "Largest request body in MiB (larger: 413).")


# ---- the app ----

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


# ---- loading the models ----

def run_name(checkpoint: str) -> str:
    """A checkpoint's model id: its folder name, or `run/checkpoint-N` for a Trainer checkpoint."""
    path = Path(checkpoint.rstrip("/"))
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def load_engines(args: Args, opts: ServeArguments, scheduler: Scheduler) -> dict[str, ChatEngine]:
    """Every model the server answers for, by id (see the module docstring)."""
    from tunelab.methods import split_checkpoints

    wanted: list[tuple[str, str | None]] = []
    if args.model.checkpoint_dir:
        wanted.append((opts.served_model_name or run_name(split_checkpoints(args.model.checkpoint_dir)[-1]),
                       args.model.checkpoint_dir))
    wanted += [(run_name(c), c) for c in split_checkpoints(opts.also_serve)]
    ids = [i for i, _ in wanted] + ([BASE_ID] if opts.serve_base or not wanted else [])
    if len(set(ids)) < len(ids):
        raise TunelabError(f"two served models would share an id ({', '.join(ids)}): rename one with "
                           "--served_model_name or leave out a duplicate")
    engines = {}
    for model_id, ckpt in wanted:
        one = dataclasses.replace(args, model=dataclasses.replace(args.model, checkpoint_dir=ckpt))
        engines[model_id] = ChatEngine.from_args(one, name=model_id, scheduler=scheduler)
    if BASE_ID in ids:
        first = (next(iter(engines.values())), split_checkpoints(wanted[0][1])[0]) if wanted else None
        engines[BASE_ID] = ChatEngine.from_args(base_args(args, *first) if first else args, name=BASE_ID,
                                                scheduler=scheduler)
    return engines


def base_args(args: Args, first: ChatEngine, checkpoint: str) -> Args:
    """The base model alone (--model_name_or_path, else the one `checkpoint` records it was trained from),
    its prompts formatted as `first` (the first checkpoint's run) formats them."""
    from tunelab.methods import read_method

    path = args.model.model_name_or_path or read_method(checkpoint).get("base_model") or first.base_path
    model = dataclasses.replace(args.model, checkpoint_dir=None, model_name_or_path=path)
    data = dataclasses.replace(args.data, template=first.template.name, source_prefix=first.source_prefix,
                               max_source_length=first.max_source_length)
    return dataclasses.replace(args, model=model, data=data)


def check_options(opts: ServeArguments) -> Scheduler:
    """The request scheduler these options ask for; a bad value fails here, before any model loads."""
    for name in ("max_tokens_limit", "max_request_mb"):
        if getattr(opts, name) <= 0:
            raise TunelabError(f"--{name} must be > 0, got {getattr(opts, name)}")
    return Scheduler(opts.max_batch_size, opts.batch_window_ms / 1000, opts.max_queue)


def main(argv: list[str]) -> int:
    import uvicorn

    args, opts = parse_with(argv, ServeArguments, prog="tunelab serve")
    scheduler = check_options(opts)
    api_key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    if opts.host not in LOOPBACK and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use the model",
                       opts.host)
    engines = load_engines(args, opts, scheduler)
    app = create_app(engines, api_key, opts.max_tokens_limit, int(opts.max_request_mb * (1 << 20)))
    print(f"tunelab serve: models {', '.join(engines)} at http://{opts.host}:{opts.port}/v1", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info")
    return 0
