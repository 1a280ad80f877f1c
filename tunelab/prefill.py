"""The prompt cache of a generation batch without running the prompts through HF's one padded forward: built
from chunks of similar length (chunked prefill), or from the keys/values a likelihood pass kept (PromptCache).

    cache = chunked_prefill(model, input_ids, attention_mask, max_chunk_tokens=1024)   # None: not applicable
    cache = stacked_cache(model, [prompt_cache.take(i) for i in rows], input_ids.shape[1] - 1)
    model.generate(input_ids=input_ids, attention_mask=attention_mask, **{generate_cache_kwarg(model): cache}, ...)

Why: a big generation batch decodes fast (one pass over the weights serves every row), but its prompts are
left-padded to the longest one, and the prompt forward (prefill) then computes the padding too: 100 alpaca
prompts of 4,587 tokens become 9,000 (bench/README.md). Prompts arrive longest first (tunelab.generation),
so consecutive chunks of rows have similar lengths: each chunk runs its own forward with little padding,
and its keys/values are left-padded (zeros, masked) to the batch width and stacked into one cache.
Exact: a real token's keys/values depend only on the tokens before it and on its position, which counts
attended tokens only (tunelab.prefix.positions_from_mask, as generate() computes them), so they are the
same whatever the padding; padded slots are masked in every later step. The cache holds all but the last
prompt column, so generate() runs that column (its logits give the first new token) and decodes on from
there, as when it continues from a given cache.

PromptCache: the likelihood pass of `tunelab eval/predict` runs prompt + reference through the model anyway;
its keys/values at the prompt positions are the prompt's own (causal attention), so it keeps them for the
samples to be generated and generation decodes on from them: the prompt's forward runs once (0 prefill
FLOPs in generation; 100 alpaca prompts: 33.4 -> 22.8 s of generation on the AVX2 class, bench/README.md).

Both apply to a plain HF causal LM or a peft model that adds weights (LoRA), greedy or sampled, one answer per
prompt, with transformers' plain dynamic cache. Not applied (None: generate() prefills as usual) to
P-Tuning (its cache holds the prefix), beam search or several answers per prompt (generate() would repeat
the rows, not the cache), caches of another kind (sliding windows, hybrid models), or a batch that one
forward covers without a split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.prefix import cache_kwarg, positions_from_mask


def applies(model, gen_kwargs: dict[str, Any]) -> bool:
    """Whether the cache this module builds is the one `model.generate(**gen_kwargs)` would build."""
    if gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("num_return_sequences", 1) != 1:
        return False
    if getattr(model, "config", None) is None or hasattr(model, "make_cache"):
        return False  # not an HF model; or tunelab's P-Tuning wrapper, whose cache holds its prefix
    peft_config = getattr(model, "active_peft_config", None)
    return not getattr(peft_config, "is_prompt_learning", False)


def generate_cache_kwarg(model) -> str:
    """The name under which `model.generate` takes the cache: the HF model's own (a peft model passes it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return cache_kwarg(base)


def chunk_rows(lengths: list[int], max_chunk_tokens: int) -> list[range]:
    """Consecutive row ranges (rows longest first) of at most `max_chunk_tokens` padded tokens each (at least
    one row): a chunk's width is its first row's length."""
    chunks, start = [], 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or (row - start + 1) * lengths[start] > max_chunk_tokens:
            chunks.append(range(start, row))
            start = row
    return chunks


def chunked_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_chunk_tokens: int):
    """The dynamic cache of `input_ids[:, :-1]` (a left-padded batch, rows longest first), computed chunk by
    chunk; None when one chunk would cover the batch, or the model's cache is not transformers' plain
    DynamicCache (see the module docstring)."""
    width = input_ids.shape[1]
    lengths = [int(n) for n in attention_mask.sum(1).tolist()]
    if width < 2 or lengths != sorted(lengths, reverse=True):
        return None
    chunks = chunk_rows(lengths, max_chunk_tokens)
    if len(chunks) < 2:
        return None
    pieces: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
    for rows in chunks:
        chunk_width = max(lengths[rows.start], 1)
        cols = slice(width - chunk_width, width - 1)  # the chunk's own columns, without the last one
        ids, mask = input_ids[rows.start:rows.stop, cols], attention_mask[rows.start:rows.stop, cols]
        cache = _forward_cache(model, ids, mask) if ids.shape[1] else None
        if cache is not None and not plain_dynamic(cache):
            return None
        # each row's real tokens are the last (length - 1) columns of its chunk (left padding)
        pieces += [row_pieces(cache, r - rows.start, range(chunk_width - lengths[r], chunk_width - 1))
                   if cache is not None else None for r in rows]
    return stacked_cache(model, pieces, width - 1)


def plain_dynamic(cache) -> bool:
    """Whether every layer of `cache` is transformers' plain DynamicLayer (no sliding window, no states)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def row_pieces(cache, row: int, cols: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's keys and values [kv_heads, len(cols), head_dim] at positions `cols`, every layer."""
    return [(layer.keys[row, :, cols.start:cols.stop], layer.values[row, :, cols.start:cols.stop])
            for layer in cache.layers]


def stacked_cache(model, pieces: list, width: int):
    """A DynamicCache [rows, kv_heads, width, head_dim] of each row's pieces, right-aligned (left padding:
    zeros, masked); a row's pieces None or empty: all zeros."""
    from transformers import DynamicCache

    ref = next(p for p in pieces if p)
    data = []
    for layer in range(len(ref)):
        keys, values = [], []
        for row in pieces:
            k, v = row[layer] if row else (ref[layer][0][:, :0], ref[layer][1][:, :0])
            keys.append(F.pad(k, (0, 0, width - k.shape[1], 0)))
            values.append(F.pad(v, (0, 0, width - v.shape[1], 0)))
        data.append((torch.stack(keys), torch.stack(values)))
    return DynamicCache(ddp_cache_data=data, config=model.config)


class PromptCache:
    """Prompt keys/values that a likelihood pass over prompt + reference saves for the generation that follows,
    so the prompt's forward runs once (tunelab/evaluate.py). A row's keys and values at its prompt positions
    are the prompt's own (causal attention: they never see the reference after them), except the last prompt
    token's, which generation runs itself.

    `wanted`: sample index -> prompt length, for the samples that will be generated. `max_bytes` bounds what
    is kept (past it, the rest are prefilled by generation as usual). `view(indices)` is the same store seen
    through local positions (a shard, a subset): position j -> sample indices[j]."""

    def __init__(self, wanted: dict[int, int], max_bytes: int, _shared: dict | None = None, _map=None):
        self.wanted, self.max_bytes = wanted, max_bytes
        self._shared = {"store": {}, "bytes": 0} if _shared is None else _shared  # one store for all views
        self._store = self._shared["store"]  # index -> pieces
        self._map = _map

    def view(self, indices: list[int]) -> PromptCache:
        index = self._index
        return PromptCache(self.wanted, self.max_bytes, self._shared, [index(i) for i in indices])

    def _index(self, position: int) -> int:
        return position if self._map is None else self._map[position]

    def prompt_len(self, position: int) -> int | None:
        """The prompt length to keep for this row, or None (not generated, already kept, or over budget)."""
        index = self._index(position)
        if index in self._store or index not in self.wanted or self._shared["bytes"] >= self.max_bytes:
            return None
        return self.wanted[index]

    def add(self, position: int, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._store[self._index(position)] = [(k.clone(), v.clone()) for k, v in pieces]  # not views of the batch
        self._shared["bytes"] += sum(t.numel() * t.element_size() for kv in pieces for t in kv)

    def take(self, position: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The row's pieces (freed from the store), or None."""
        return self._store.pop(self._index(position), None)


class ChainedPromptCaches:
    """Several data sets' prompt caches end to end, as one generation over all their prompts sees them
    (tunelab/evaluate.py's joint generation): position j of the whole is position j - offset in the part it
    falls in. `parts`: (a PromptCache view or None, its number of prompts), in order."""

    def __init__(self, parts: list[tuple[PromptCache | None, int]], _map: list[int] | None = None):
        self.parts, self._map = parts, _map

    def view(self, indices: list[int]) -> ChainedPromptCaches:
        return ChainedPromptCaches(self.parts, [self._position(i) for i in indices])

    def _position(self, position: int) -> int:
        return position if self._map is None else self._map[position]

    def take(self, position: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        local = self._position(position)
        for cache, size in self.parts:
            if local < size:
                return None if cache is None else cache.take(local)
            local -= size
        raise IndexError(f"prompt {position} is past the {sum(n for _, n in self.parts)} prompts of the caches")


def output_cache(out):
    """The KV cache in a model output (transformers 5 names it `cache`, earlier ones `past_key_values`)."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def _forward_cache(model, ids: torch.Tensor, mask: torch.Tensor):
    return output_cache(model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                              use_cache=True, logits_to_keep=1))


__all__ = ["ChainedPromptCaches", "PromptCache", "applies", "chunk_rows", "chunked_prefill", "generate_cache_kwarg", "output_cache",
           "stacked_cache"]
