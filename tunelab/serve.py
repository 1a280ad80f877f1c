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

This module is the command (its options, model loading); the FastAPI app is tunelab/serve_app.py, imported
only after the flags parse, so `tunelab serve --help` loads neither FastAPI nor torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError
from tunelab.hparams import Args, _opt, listen_arguments, parse_with

if TYPE_CHECKING:
    from tunelab.engine import ChatEngine, Scheduler

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


# ---- loading the models ----

def run_name(checkpoint: str) -> str:
    """A checkpoint's model id: its folder name, or `run/checkpoint-N` for a Trainer checkpoint."""
    path = Path(checkpoint.rstrip("/"))
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def load_engines(args: Args, opts: ServeArguments, scheduler: Scheduler) -> dict[str, ChatEngine]:
    """Every model the server answers for, by id (see the module docstring)."""
    from tunelab.engine import ChatEngine
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
    from tunelab.batching import Scheduler

    for name in ("max_tokens_limit", "max_request_mb"):
        if getattr(opts, name) <= 0:
            raise TunelabError(f"--{name} must be > 0, got {getattr(opts, name)}")
    return Scheduler(opts.max_batch_size, opts.batch_window_ms / 1000, opts.max_queue)


def main(argv: list[str]) -> int:
    args, opts = parse_with(argv, ServeArguments, prog="tunelab serve")
    scheduler = check_options(opts)
    api_key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    if opts.host not in LOOPBACK and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use the model",
                       opts.host)
    import uvicorn

    from tunelab.serve_app import create_app

    engines = load_engines(args, opts, scheduler)
    app = create_app(engines, api_key, opts.max_tokens_limit, int(opts.max_request_mb * (1 << 20)))
    print(f"tunelab serve: models {', '.join(engines)} at http://{opts.host}:{opts.port}/v1", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info")
    return 0
