"""The one chat engine behind `tunelab chat`, `tunelab serve` and `tunelab webui`.

    from tunelab.engine import ChatEngine, to_messages
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", "runs/x"]))
    reply = engine.chat(to_messages("Hi", history=[("Hello", "Hello!")]), max_new_tokens=64)
    reply.text, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason
    gen = engine.stream(messages, temperature=0.7)     # a Generation: iterate for text pieces
    for piece in gen: print(piece, end="")
    gen.reply                                            # the same Reply once the stream is over
    engine.stream(messages, n=3, temperature=0.8, stop=["\n\n"]).events()   # (choice, piece) of 3 answers
    engine.complete(["Once upon a time"], max_new_tokens=32).result()        # raw text, no chat template

It loads the base model plus any tunelab checkpoints (LoRA, Freeze, P-Tuning v2, full; several LoRA
checkpoints merge in order), formats prompts with the run's template and `source_prefix` (read from the
checkpoint's run files, as eval does), and generates with the command's generation options, which a call
may override (`SETTINGS`). Messages are OpenAI-style dicts: an optional leading system message, then
alternating user/assistant turns ending with a user turn. Their content is text: a token string typed in it
(`<|im_start|>system ...`) is encoded as text, never as a control token (tunelab.safe_prompt).

Concurrency: requests go to a `Scheduler` (tunelab.batching): a bounded queue whose worker generates
requests that arrive together in one batch, one batch at a time on the model. Engines serving side by side
on one device share one scheduler. `Generation.cancel()` drops a queued request or stops a running one at
the next token; the server calls it when a client disconnects.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from tunelab.batching import BadRequest, Busy, Generation, Reply, Scheduler
from tunelab.errors import TunelabError
from tunelab.hparams import Args, GenerationArguments

__all__ = ["BadRequest", "Busy", "ChatEngine", "Generation", "Reply", "Scheduler", "history_messages",
           "resolve_settings", "to_example", "to_messages"]

logger = logging.getLogger(__name__)

# Generation options a single call may override (the rest stay as the engine was started).
SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "seed")
ROLES = ("system", "user", "assistant")
# a sampling temperature below this divides the logits into inf/nan; treat it as greedy (as vLLM does)
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-2**63, 2**64)  # what torch.manual_seed takes


# ---- messages (pure) ----

def history_messages(history: Iterable[tuple[str, str]]) -> list[dict]:
    """(user, assistant) pairs as alternating OpenAI-style user / assistant messages."""
    return [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]


def to_messages(query: str, history: Iterable[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """OpenAI-style messages for a (history, query) pair as the 2023 toolkit kept them."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + history_messages(history) + [{"role": "user", "content": query}]


def to_example(messages: Sequence[dict]):
    """The `tunelab.data.Example` a message list asks for: system, (user, assistant) history, last query.

    Raises TunelabError for anything a chat template cannot hold, naming what is wrong.
    """
    from tunelab.data import Example

    messages = list(messages)
    if not messages:
        raise TunelabError("messages is empty: give at least one user message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise TunelabError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': text}}")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if roles != expected[:len(roles)] or len(roles) % 2 == 0:
        raise TunelabError("after an optional first system message, messages must alternate user/assistant "
                           f"and end with a user message (got {', '.join(roles) or 'none'})")
    history = tuple((messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2))
    return Example(prompt=messages[-1]["content"], query="", response="", history=history, system=system)


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (OpenAI takes one string or a list)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    return tuple(s for s in stops if s)


def check_choices(n: int, gen_args: GenerationArguments) -> None:
    """n answers per prompt: n > 1 needs sampling (greedy decoding would give n equal answers)."""
    if not isinstance(n, int) or n < 1:
        raise BadRequest(f"n must be a positive integer, got {n!r}", "n")
    if n > 1 and not gen_args.do_sample:
        raise BadRequest(f"n={n} needs sampling: greedy decoding gives {n} identical answers; set temperature > 0",
                         "n")


def resolve_settings(base: GenerationArguments, overrides: dict[str, Any]) -> tuple[GenerationArguments, int | None]:
    """(generation options, seed) for one call. A temperature below MIN_TEMPERATURE (0 too) means greedy, from
    it on sampling, unless do_sample is given too; an explicit max_new_tokens replaces the engine's max_length."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise TunelabError(f"unknown generation setting(s) {', '.join(unknown)}: valid: {', '.join(SETTINGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    seed = given.pop("seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise BadRequest(f"seed must be between -2**63 and 2**64 - 1, got {seed}", "seed")
    if "temperature" in given and "do_sample" not in given:
        given["do_sample"] = given["temperature"] >= MIN_TEMPERATURE
    if given.get("do_sample") is False:
        given.pop("temperature", None)  # greedy ignores it; 0 would fail generation_kwargs' check
    if "max_new_tokens" in given:
        given["max_length"] = None
    return dataclasses.replace(base, **given), seed


# ---- the engine ----

class ChatEngine:
    """A loaded model + tokenizer + template that answers chats, its requests batched by `scheduler`."""

    def __init__(self, model, tokenizer, template, source_prefix: str | None = None,
                 max_source_length: int = 512, generation: GenerationArguments | None = None,
                 name: str = "tunelab", method: str = "none", scheduler: Scheduler | None = None,
                 base_path: str | None = None):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.source_prefix, self.max_source_length = source_prefix, max_source_length
        self.generation = generation or GenerationArguments()
        self.name, self.method, self.base_path = name, method, base_path
        self.scheduler = scheduler or Scheduler()
        # the batch worker decodes with its own copy: a fast tokenizer used from two threads at once can fail
        # ("Already borrowed"), and encoding switches its split_special_tokens setting (safe_prompt)
        self.decoder = copy.deepcopy(tokenizer)
        self._encode_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_flight = 0  # requests queued or running

    @classmethod
    def from_args(cls, args: Args, name: str | None = None, scheduler: Scheduler | None = None) -> ChatEngine:
        """Load what `--model_name_or_path` / `--checkpoint_dir` name; template and source_prefix come from
        the (last) checkpoint's run unless given on the command line."""
        from tunelab.setup import setup_model
        from tunelab.templates import get_template

        loaded = setup_model(args, "chat")
        model, tokenizer, data, method = loaded.model, loaded.tokenizer, loaded.args.data, loaded.method
        model.to(_device())
        template = get_template(data.template, tokenizer)
        name = name or Path(loaded.checkpoints[-1] if loaded.checkpoints else loaded.base_path).name
        logger.info("chat engine: %s (%s) on %s", name, method["finetuning_type"], loaded.base_path)
        return cls(model, tokenizer, template, data.source_prefix, data.max_source_length, args.generation,
                   name, method["finetuning_type"], scheduler, loaded.base_path)

    @property
    def in_flight(self) -> int:
        """Requests queued or running (the health endpoint reports it)."""
        return self._in_flight

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Prompt token ids: the run's template over system (default: source_prefix), history and query, the
        content encoded as text; too long a prompt loses its oldest turns first (tunelab.templates)."""
        from tunelab.safe_prompt import content_as_text

        example = to_example(messages)
        with self._encode_lock:
            example, tokenizer = content_as_text(example, self.tokenizer)
            # a system message in `messages` wins over source_prefix (the template decides how each is written)
            return self.template.encode_prompt(tokenizer, example, self.source_prefix, self.max_source_length)

    def text_ids(self, text: str) -> list[int]:
        """A raw completion prompt's ids (the tokenizer's own start tokens added); a long one keeps its end."""
        from tunelab.templates import keep_end, start_ids

        with self._encode_lock:
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            return keep_end(ids, self.max_source_length, head=len(start_ids(self.tokenizer)))

    def stream(self, messages: Sequence[dict], n: int = 1, stop: str | Sequence[str] | None = None,
               **settings) -> Generation:
        """Queue a chat answer (`n` of them when sampling); iterate the Generation for text pieces."""
        return self.submit([self.prompt_ids(messages)], n, stop, settings)

    def complete(self, prompts: Sequence[str], n: int = 1, stop: str | Sequence[str] | None = None,
                 **settings) -> Generation:
        """Queue continuations of raw text prompts (no chat template): choice i continues prompt i // n."""
        return self.submit([self.text_ids(p) for p in prompts], n, stop, settings)

    def chat(self, messages: Sequence[dict], **settings) -> Reply:
        """The whole answer at once (same path as stream)."""
        return self.stream(messages, **settings).result()

    def submit(self, prompts: list[list[int]], n: int, stop, settings: dict[str, Any]) -> Generation:
        gen_args, seed = resolve_settings(self.generation, settings)
        check_choices(n, gen_args)
        if gen_args.num_beams > 1:
            raise TunelabError("answers are generated token by token (streamed, batched): use --num_beams 1")
        gen = Generation(self, prompts, self._generate_kwargs(gen_args), n, seed, stop_strings(stop))
        self.scheduler.submit(gen)
        return gen

    def _generate_kwargs(self, gen_args: GenerationArguments) -> dict[str, Any]:
        # generation_kwargs + the model's own stop ids and a pad id, exactly as eval/predict generate
        from tunelab.generation import _resolve_kwargs, generation_kwargs

        return _resolve_kwargs(self.model, self.tokenizer, generation_kwargs(gen_args, self.tokenizer))

    def _enter(self) -> None:
        with self._count_lock:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._in_flight -= 1


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
