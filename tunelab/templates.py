"""Prompt formats: an `Example` -> token ids, the same way for training, eval and generation.

    from tunelab.templates import get_template
    template = get_template("auto", tokenizer)                       # auto | chatglm | plain
    input_ids, labels = template.encode_train(tokenizer, ex, source_prefix, 512, 512)
    prompt_ids = template.encode_prompt(tokenizer, ex, source_prefix, 512)   # what generation continues

Every format splits an example into prompt text (system, history turns, query — all of it is context, as in
2023) and response text. Labels are -100 on every prompt token, so the loss covers only the final response and
the token(s) that end it (the tokenizer's eos, or the chat template's end-of-turn text).

- auto: the tokenizer's own chat template. The prompt is the conversation rendered with
  add_generation_prompt=True; the response is what the full rendering (with the assistant answer) adds after it.
- chatglm: ChatGLM-Efficient-Tuning's April-2023 format (src/utils/common.py, format_example): the query is
  prompt+query with no separator; without history the prompt is just that query; with history it is
  "[Round 0]\\n问：{q}\\n答：{r}\\n" ... "[Round {n}]\\n问：{query}\\n答："; --source_prefix goes verbatim in front
  (a data set's own system text, which 2023 did not have, goes in front followed by a line break).
  ChatGLM-6B's own [gMASK]/<sop> tokens exist only in its tokenizer; elsewhere the tokenizer's start token (if it
  adds one to plain text) comes first and its eos after the response.
- plain: for base models without a chat template: "{system}\\n\\n{q}\\n{r}\\n...{query}\\n" then response + eos.

Truncation: a prompt longer than max_source_length first loses its oldest history turns, whole, so the system
prompt (a persona) and the latest turns stay; if it is still too long it keeps its END (the query nearest the
answer; the start token stays). A long response is cut, keeping its end-of-turn tokens. (2023 cut the prompt's
end instead, which could drop the question.)
"""

from __future__ import annotations

import dataclasses

from tunelab.data import Example
from tunelab.errors import TunelabError

IGNORE_INDEX = -100
TEMPLATE_VERSION = 1  # bump when any format's output changes: it is part of the tokenized-data cache key


def user_text(ex: Example) -> str:
    """The final user turn for chat formats: prompt and query on separate lines."""
    return "\n".join(t for t in (ex.prompt, ex.query) if t)


def system_text(ex: Example, source_prefix: str | None) -> str:
    """The row's own system prompt wins over --source_prefix (persona sets carry one per row)."""
    return ex.system or source_prefix or ""


def start_ids(tokenizer) -> list[int]:
    """Ids the tokenizer itself puts before plain text (e.g. Llama's <s>); [] for those that add none
    (GPT-2, Qwen, SmolLM2 — whose nominal bos <|im_start|> is not a text start token)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    marked = tokenizer.encode("a", add_special_tokens=True)
    for k in range(len(marked) - len(plain) + 1):
        if marked[k:k + len(plain)] == plain:
            return marked[:k]
    return []


def keep_end(ids: list[int], limit: int, head: int = 0) -> list[int]:
    """At most `limit` ids: the first `head` (start tokens) and the last ones."""
    if len(ids) <= limit:
        return ids
    tail = max(limit - head, 0)
    return ids[:min(head, limit)] + (ids[len(ids) - tail:] if tail else [])


class Template:
    """One prompt format. Subclasses say how an Example becomes prompt text and response text."""

    name = ""
    appends_eos = True  # text formats end the response with the tokenizer's eos id

    def prompt_text(self, ex: Example, source_prefix: str | None) -> str:
        raise NotImplementedError

    def response_text(self, ex: Example, source_prefix: str | None) -> tuple[str, str]:
        """(response, end-of-turn text after it); the end text is kept whole when the response is cut."""
        return ex.response, ""

    def render_prompt(self, ex: Example, source_prefix: str | None) -> str:
        """Human-readable prompt (generated_predictions.jsonl's "prompt")."""
        return self.prompt_text(ex, source_prefix)

    def prompt_ids(self, tokenizer, ex: Example, source_prefix: str | None) -> list[int]:
        """Untruncated prompt ids, led by the tokenizer's start token(s) whether or not the format writes them."""
        start = start_ids(tokenizer)
        ids = tokenizer.encode(self.prompt_text(ex, source_prefix), add_special_tokens=False)
        return start + ids if start and ids[:len(start)] != start else ids

    def fit(self, tokenizer, ex: Example, source_prefix: str | None,
            max_source_length: int) -> tuple[Example, list[int]]:
        """(example, prompt ids) within max_source_length: the fewest oldest history turns are dropped that make
        the prompt fit; if even no history is too long, the prompt keeps its end."""
        ids = self.prompt_ids(tokenizer, ex, source_prefix)
        if len(ids) > max_source_length and ex.history:
            def fits(drop: int) -> bool:
                trial = dataclasses.replace(ex, history=ex.history[drop:])
                return len(self.prompt_ids(tokenizer, trial, source_prefix)) <= max_source_length

            lo, hi = 1, len(ex.history)  # binary search: dropping more turns never lengthens the prompt
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
            ex = dataclasses.replace(ex, history=ex.history[lo:])
            ids = self.prompt_ids(tokenizer, ex, source_prefix)
        return ex, keep_end(ids, max_source_length, head=len(start_ids(tokenizer)))

    def encode_prompt(self, tokenizer, ex: Example, source_prefix: str | None, max_source_length: int) -> list[int]:
        return self.fit(tokenizer, ex, source_prefix, max_source_length)[1]

    def encode_train(self, tokenizer, ex: Example, source_prefix: str | None, max_source_length: int,
                     max_target_length: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels): prompt + response ids; labels -100 on the prompt."""
        ex, prompt = self.fit(tokenizer, ex, source_prefix, max_source_length)
        response, end = self.response_text(ex, source_prefix)
        body = tokenizer.encode(response, add_special_tokens=False)
        end_ids = tokenizer.encode(end, add_special_tokens=False) if end else []
        if self.appends_eos:
            end_ids = end_ids + [tokenizer.eos_token_id]
        body = body[:max(max_target_length - len(end_ids), 0)]
        return prompt + body + end_ids, [IGNORE_INDEX] * len(prompt) + body + end_ids


class ChatGLMTemplate(Template):
    name = "chatglm"

    def prompt_text(self, ex: Example, source_prefix: str | None) -> str:
        query = ex.prompt + ex.query  # 2023: no separator
        if ex.history:
            rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(ex.history))
            query = rounds + f"[Round {len(ex.history)}]\n问：{query}\n答："
        # --source_prefix is glued on verbatim as in 2023; a data set's own system text gets a line break
        prefix = ex.system + "\n" if ex.system else (source_prefix or "")
        return prefix + query


class PlainTemplate(Template):
    name = "plain"

    def prompt_text(self, ex: Example, source_prefix: str | None) -> str:
        system = system_text(ex, source_prefix)
        head = system + "\n\n" if system else ""
        return head + "".join(f"{q}\n{r}\n" for q, r in ex.history) + user_text(ex) + "\n"


class ChatTemplate(Template):
    """The tokenizer's own chat template (`apply_chat_template`)."""

    name = "auto"
    appends_eos = False  # the template writes its own end-of-turn text

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def messages(self, ex: Example, source_prefix: str | None) -> list[dict[str, str]]:
        system = system_text(ex, source_prefix)
        msgs = [{"role": "system", "content": system}] if system else []
        for q, r in ex.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        return msgs + [{"role": "user", "content": user_text(ex)}]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja errors, e.g. a template that refuses a system turn
            raise TunelabError(f"template auto: the tokenizer's chat template failed ({err}); "
                               "use --template chatglm or --template plain") from None

    def prompt_text(self, ex: Example, source_prefix: str | None) -> str:
        return self._render(self.messages(ex, source_prefix), add_generation_prompt=True)

    def response_text(self, ex: Example, source_prefix: str | None) -> tuple[str, str]:
        messages = self.messages(ex, source_prefix)
        prompt = self._render(messages, add_generation_prompt=True)
        full = self._render(messages + [{"role": "assistant", "content": ex.response}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TunelabError("template auto: the chat template renders the conversation differently once the "
                               "answer is added (the prompt is not a prefix), so the answer tokens cannot be "
                               "found; use --template chatglm or --template plain")
        segment = full[len(prompt):]
        at = segment.rfind(ex.response) if ex.response else -1
        if at < 0:  # the template rewrote the answer: supervise the whole segment
            return segment, ""
        cut = at + len(ex.response)
        return segment[:cut], segment[cut:]


TEMPLATES = {"auto": ChatTemplate, "chatglm": ChatGLMTemplate, "plain": PlainTemplate}


def get_template(name: str, tokenizer) -> Template:
    """The template called `name` for this tokenizer (errors list the valid names / say what to use)."""
    if name not in TEMPLATES:
        raise TunelabError(f"unknown template '{name}': valid: {', '.join(TEMPLATES)}")
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TunelabError("template auto: this tokenizer has no chat template (a base model?); use "
                               "--template chatglm (the 2023 format) or --template plain")
        return ChatTemplate(tokenizer)
    if tokenizer.eos_token_id is None:
        raise TunelabError(f"template {name}: the tokenizer has no eos token to end responses with")
    return TEMPLATES[name]()
