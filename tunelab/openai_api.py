"""OpenAI's API shapes for `tunelab serve`: request bodies (validated by pydantic), errors, response bodies.

Pure: no model, no server. tunelab/serve.py wires these to the engine. Request limits that keep a hostile
client from exhausting the server (numbers a model cannot honour: non-finite floats, a seed torch cannot
take, thousands of choices or stop strings) are refused here as 400s naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from tunelab.batching import Generation, Reply

MAX_CHOICES = 16  # n
MAX_STOPS = 16  # OpenAI takes 4; LangChain-style clients may send a few more
MAX_PROMPTS = 16  # /v1/completions prompt lists



def _encodable(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"); no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode at character {err.start} (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOPS)] | None


# ---- request bodies ----

class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")  # clients send more fields (user, metadata, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    repetition_penalty: Finite | None = Field(None, ge=0.01, le=100)  # an extension, as vLLM has it
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.manual_seed takes
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False  # echo, logprobs, suffix and best_of > 1 are not offered (a 400 says so)
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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
    # a union (str | list) reports its branch ('stop.list[str].0'); name the field the client sent
    loc = [p for p in loc if not ("[" in p or p in ("str", "int", "float", "bool", "none"))]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: 400 for what FastAPI would answer 422, and a 500 body for a bug."""

    @app.exception_handler(APIError)
    async def _api(_: Request, err: APIError):
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException):  # unknown route, wrong method, body too large
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception):
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)


# ---- responses ----

def finish_reason(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_completion(model: str, gen: Generation) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": finish_reason(r),
                "logprobs": None} for i, r in enumerate(gen.replies)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": gen.usage}


def text_completion(model: str, gen: Generation) -> dict[str, Any]:
    choices = [{"index": i, "text": r.text, "finish_reason": finish_reason(r), "logprobs": None}
               for i, r in enumerate(gen.replies)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": gen.usage}


class Chunks:
    """The SSE data lines of one streamed answer, chat or text completion."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _line(self, choices: list[dict], **extra) -> str:
        return json.dumps({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": choices, **extra}, ensure_ascii=False)

    def _choice(self, index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    def start(self, choices: int) -> list[str]:
        """Chat streams open each choice with the assistant role; text streams start with text."""
        return [self._line([self._choice(i, None, None, role=True)]) for i in range(choices)] if self.chat else []

    def piece(self, index: int, text: str) -> str:
        return self._line([self._choice(index, text, None)])

    def finish(self, gen: Generation, include_usage: bool) -> list[str]:
        lines = [self._line([self._choice(i, None, finish_reason(r))]) for i, r in enumerate(gen.replies)]
        if include_usage:
            lines.append(self._line([], usage=gen.usage))
        return lines + ["[DONE]"]
