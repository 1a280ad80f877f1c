"""The one chat engine behind `tunelab chat`, `tunelab serve` and `tunelab webui`.

    from tunelab.engine import ChatEngine, to_messages
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", "runs/x"]))
    reply = engine.chat(to_messages("Hi", history=[("Hello", "Hello!")]), max_new_tokens=64)
    reply.text, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason
    gen = engine.stream(messages, temperature=0.7)     # a Generation: iterate for text pieces
    for piece in gen: print(piece, end="")
    gen.reply                                            # the same Reply once the stream is over
    engine.stream(messages).result()                     # = engine.chat(messages)

It loads the base model plus any tunelab checkpoints (LoRA, Freeze, P-Tuning v2, full; several LoRA
checkpoints merge in order), formats prompts with the run's template and `source_prefix` (read from the
checkpoint's run files, as eval does), and generates with the command's generation options, which a call
may override (`SETTINGS`). Messages are OpenAI-style dicts: an optional leading system message, then
alternating user/assistant turns ending with a user turn.

Concurrency: one model, one generation at a time. Each generation runs in its own thread, which takes the
engine's lock, so requests wait their turn (a plain lock: not strictly first come, first served) and
never interleave on the model. `Generation.cancel()`
stops a queued or running generation at the next token (a StoppingCriteria reads the cancel event), which
frees the model for the next request; the server calls it when a client disconnects.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from transformers import StoppingCriteria

from tunelab.errors import TunelabError
from tunelab.hparams import Args, GenerationArguments

logger = logging.getLogger(__name__)

# Generation options a single call may override (the rest stay as the engine was started).
SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "seed")
ROLES = ("system", "user", "assistant")


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


def resolve_settings(base: GenerationArguments, overrides: dict[str, Any]) -> tuple[GenerationArguments, int | None]:
    """(generation options, seed) for one call. A temperature of 0 means greedy, above 0 sampling, unless
    do_sample is given too; an explicit max_new_tokens replaces the engine's max_length."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise TunelabError(f"unknown generation setting(s) {', '.join(unknown)}: valid: {', '.join(SETTINGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    seed = given.pop("seed", None)
    if "temperature" in given and "do_sample" not in given:
        given["do_sample"] = given["temperature"] > 0
    if given.get("do_sample") is False:
        given.pop("temperature", None)  # greedy ignores it; 0 would fail generation_kwargs' check
    if "max_new_tokens" in given:
        given["max_length"] = None
    return dataclasses.replace(base, **given), seed


# ---- the engine ----

@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens before the stop token
    finish_reason: str  # "stop" (end token), "length" (token budget) or "cancelled"

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatEngine:
    """A loaded model + tokenizer + template that answers chats one generation at a time."""

    def __init__(self, model, tokenizer, template, source_prefix: str | None = None,
                 max_source_length: int = 512, generation: GenerationArguments | None = None,
                 name: str = "tunelab", method: str = "none"):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.source_prefix, self.max_source_length = source_prefix, max_source_length
        self.generation = generation or GenerationArguments()
        self.name, self.method = name, method
        self._lock = threading.Lock()  # held by the one generation running on the model
        self._count_lock = threading.Lock()
        self._in_flight = 0  # generations queued or running

    @classmethod
    def from_args(cls, args: Args, name: str | None = None) -> ChatEngine:
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
        return cls(model, tokenizer, template, data.source_prefix, data.max_source_length,
                   args.generation, name, method["finetuning_type"])

    @property
    def in_flight(self) -> int:
        """Generations queued or running (the health endpoint reports it)."""
        return self._in_flight

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Prompt token ids: the run's template over system (default: source_prefix), history and query;
        too long a prompt loses its oldest turns first (tunelab.templates)."""
        # a system message in `messages` wins over source_prefix (the template decides how each is written)
        return self.template.encode_prompt(self.tokenizer, to_example(messages), self.source_prefix,
                                           self.max_source_length)

    def stream(self, messages: Sequence[dict], **settings) -> Generation:
        """Start a generation (queued behind any running one); iterate it for text pieces."""
        gen_args, seed = resolve_settings(self.generation, settings)
        return Generation(self, self.prompt_ids(messages), self._generate_kwargs(gen_args), seed)

    def chat(self, messages: Sequence[dict], **settings) -> Reply:
        """The whole answer at once (same path as stream)."""
        return self.stream(messages, **settings).result()

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


class Generation:
    """One answer being generated in its own thread. Iterate for text pieces (TextIteratorStreamer) or call
    `result()`; `cancel()` stops it at the next token; `reply` holds the whole answer once iteration ends."""

    def __init__(self, engine: ChatEngine, prompt: list[int], kwargs: dict[str, Any], seed: int | None = None):
        from transformers import TextIteratorStreamer

        if not prompt:
            raise TunelabError("the prompt is empty: nothing to answer")
        self.engine, self.prompt, self.kwargs, self.seed = engine, prompt, kwargs, seed
        self.streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cancelled = threading.Event()
        self.reply: Reply | None = None
        self._error: BaseException | None = None
        engine._enter()
        self._thread = threading.Thread(target=self._run, name="tunelab-generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        for piece in self.streamer:
            if piece:
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error

    def result(self) -> Reply:
        """Wait for the whole answer."""
        for _ in self:
            pass
        return self.reply

    def _run(self) -> None:
        try:
            with self.engine._lock:  # queue behind the running generation
                if self.cancelled.is_set():
                    self.reply = Reply("", len(self.prompt), 0, "cancelled")
                    self.streamer.end()
                    return
                self.reply = self._generate()
        except BaseException as err:  # re-raised in the consumer's thread by __iter__
            self._error = err
            self.streamer.end()
        finally:
            self.engine._leave()

    def _generate(self) -> Reply:
        import torch
        from transformers import StoppingCriteriaList

        engine = self.engine
        device = getattr(engine.model, "device", None) or next(engine.model.parameters()).device
        if self.seed is not None:
            torch.manual_seed(self.seed)  # under the lock, so a seeded request is repeatable
        input_ids = torch.tensor([self.prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=self.streamer,
                stopping_criteria=StoppingCriteriaList([_CancelCriteria(self.cancelled)]), **self.kwargs)
        new = getattr(out, "sequences", out)[0, len(self.prompt):].tolist()
        return self._reply(new)

    def _reply(self, new: list[int]) -> Reply:
        from tunelab.generation import cut_at_end

        answer, stopped = cut_at_end(new, self.kwargs.get("eos_token_id") or [])
        reason = "stop" if stopped else "cancelled" if self.cancelled.is_set() else "length"
        text = self.engine.tokenizer.decode(answer, skip_special_tokens=True)
        return Reply(text, len(self.prompt), len(answer), reason)


class _CancelCriteria(StoppingCriteria):
    """Stops generate() once the cancel event is set (checked after every token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
