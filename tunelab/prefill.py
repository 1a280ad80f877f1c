"""Chunked prefill: the prompt cache of a large left-padded generation batch, built from chunks of similar length.

    cache = chunked_prefill(model, input_ids, attention_mask, max_chunk_tokens=4096)   # None: not applicable
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

Applies to a plain HF causal LM or a peft model that adds weights (LoRA), greedy or sampled, one answer per
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
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    width = input_ids.shape[1]
    lengths = attention_mask.sum(1).tolist()
    if width < 2 or lengths != sorted(lengths, reverse=True):
        return None
    chunks = chunk_rows(lengths, max_chunk_tokens)
    if len(chunks) < 2:
        return None
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for rows in chunks:
        chunk_width = max(int(lengths[rows.start]), 1)
        cols = slice(width - chunk_width, width - 1)  # the chunk's own columns, without the last one
        ids, mask = input_ids[rows.start:rows.stop, cols], attention_mask[rows.start:rows.stop, cols]
        cache = _forward_cache(model, ids, mask) if ids.shape[1] else None
        if cache is not None and any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        for layer in range(_num_layers(model, cache, keys)):
            if len(keys) <= layer:
                keys.append([]), values.append([])
            k, v = (cache.layers[layer].keys, cache.layers[layer].values) if cache is not None else (None, None)
            keys[layer].append(_left_pad(k, width - 1, rows, keys, layer))
            values[layer].append(_left_pad(v, width - 1, rows, keys, layer))
    data = [(torch.cat(k), torch.cat(v)) for k, v in zip(keys, values)]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def _forward_cache(model, ids: torch.Tensor, mask: torch.Tensor):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                logits_to_keep=1)
    return out["cache"] if "cache" in out else out["past_key_values"]


def _num_layers(model, cache, keys) -> int:
    return len(cache.layers) if cache is not None else len(keys)


def _left_pad(kv: torch.Tensor | None, width: int, rows: range, keys, layer: int) -> torch.Tensor:
    """[rows, heads, w, dim] -> [rows, heads, width, dim], zeros in front (masked slots). A chunk of one-token
    prompts has no cache: zeros shaped like the other chunks'."""
    if kv is None:
        ref = keys[layer][0]
        return ref.new_zeros(len(rows), ref.shape[1], width, ref.shape[3])
    return F.pad(kv, (0, 0, width - kv.shape[2], 0))


__all__ = ["applies", "chunk_rows", "chunked_prefill", "generate_cache_kwarg"]
