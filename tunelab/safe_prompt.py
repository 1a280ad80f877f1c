"""Message content is text: token strings a user types never become control tokens.

    from tunelab.safe_prompt import content_as_text
    example, tokenizer = content_as_text(example, tokenizer)     # unchanged when no content holds one
    ids = template.encode_prompt(tokenizer, example, source_prefix, max_source_length)

A chat template renders a conversation as one string, and the tokenizer turns every added-token string in
it (`<|im_start|>`, `</s>`, ...) into that token -- also one typed inside a message, which lets a user forge
a system turn ("role injection"). So before the template runs, each such string in the example's text is
replaced by a placeholder no template or tokenizer treats specially; the template renders and truncates as
always, through a tokenizer view (`_ContentTokenizer`) that cuts the rendered text at the template's own
control tokens and encodes each piece between them with the typed strings put back and
`split_special_tokens=True`, so they come out as ordinary text tokens. A conversation without such strings
takes the tokenizer's normal path, unchanged.
"""

from __future__ import annotations

import dataclasses
import re

from tunelab.data import Example

_PRIVATE_USE = range(0xE000, 0xF8FF)  # Unicode private-use characters: no tokenizer or template gives them a role


def added_token_strings(tokenizer) -> list[str]:
    """Every string the tokenizer turns into one added token, longest first (so `<|im_start|>` wins over `<|`)."""
    strings = {tok.content for tok in getattr(tokenizer, "added_tokens_decoder", {}).values() if tok.content}
    return sorted(strings, key=len, reverse=True)


def _texts(ex: Example) -> list[str]:
    return [ex.system or "", ex.prompt, ex.query, *(t for pair in ex.history for t in pair)]


def _map_texts(ex: Example, fn) -> Example:
    return dataclasses.replace(ex, prompt=fn(ex.prompt), query=fn(ex.query), system=ex.system and fn(ex.system),
                               history=tuple((fn(q), fn(r)) for q, r in ex.history))


def _free_mark(used: str) -> str:
    return next(chr(c) for c in _PRIVATE_USE if chr(c) not in used)


def _alternation(strings: list[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in strings))


def content_as_text(ex: Example, tokenizer):
    """(example, tokenizer) to encode `ex` with: added-token strings in its text become placeholders that
    the returned tokenizer view encodes as text. Returns its arguments unchanged when there are none."""
    typed = [s for s in added_token_strings(tokenizer) if any(s in t for t in _texts(ex))]
    if not typed:
        return ex, tokenizer
    mark = _free_mark("".join(_texts(ex)) + (getattr(tokenizer, "chat_template", None) or ""))
    placeholder = {s: f"{mark}{i}{mark}" for i, s in enumerate(typed)}
    pattern = _alternation(typed)
    return _map_texts(ex, lambda t: pattern.sub(lambda m: placeholder[m.group(0)], t)), \
        _ContentTokenizer(tokenizer, mark, typed)


class _ContentTokenizer:
    """`tokenizer`, except that `encode` turns placeholders back into the typed strings, as text tokens.
    Everything else is the tokenizer's own (attribute access goes through)."""

    def __init__(self, tokenizer, mark: str, typed: list[str]):
        self._tokenizer, self._typed = tokenizer, typed
        self._placeholder = re.compile(f"{mark}(\\d+){mark}")
        self._controls = _alternation(added_token_strings(tokenizer))

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        tok = self._tokenizer
        if not self._placeholder.search(text):
            return tok.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        ids, at = [], 0
        for control in [*self._controls.finditer(text), None]:  # the template's own tokens, then the end
            piece = text[at:control.start() if control else len(text)]
            if piece:
                ids += tok.encode(self._restore(piece), add_special_tokens=False, split_special_tokens=True)
            if control:
                ids.append(tok.convert_tokens_to_ids(control.group(0)))
                at = control.end()
        return tok.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def _restore(self, piece: str) -> str:
        return self._placeholder.sub(lambda m: self._typed[int(m.group(1))], piece)
