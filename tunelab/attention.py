"""Padding-free training batches: a padded batch packed into one row, and the attention that keeps samples apart.

What: `pack_batch` turns a right-padded batch [B, T] into one row [1, N] holding its N real tokens, samples
back to back; `packed_attention` (registered under transformers' public AttentionInterface by
`enable_packed_attention`) runs causal attention inside each sample of that row.
Why: the padded batch spends FLOPs and memory on padding; the packed row spends none (1.6x on alpaca rows cut
at 256 tokens, bench/README.md). On a CPU, batches without padding are packed too when their rows fit the
matmul attention below (12% faster than SDPA on the dense batch there).
Math preserved: every sample attends causally to its own tokens only, with positions restarting at 0 and
the same targets (a sample's first label is dropped, which the padded batch never predicts either), so the
loss and gradients equal the padded batch's up to float rounding (tests/test_attention.py, test_speed.py).
Consecutive samples of one length share one batched attention call. On a CPU, samples of up to
`SpeedupOptions.matmul_max_len` tokens go through `_matmul_attention` (two batched matmuls and a softmax,
transformers' eager attention); longer ones, and every sample elsewhere, through SDPA.
With dropout, the random masks are drawn over the packed tensor, so a seeded run draws different (equally
distributed) masks than a padded one would.
Generation runs under the same registered attention (tunelab/generation.py): a decoding step's one query row
per sample goes, on a CPU, through `_decode_attention` (two matmuls and an fp32 softmax) instead of SDPA,
whose CPU kernel is built for long query blocks: in bf16 at 100 rows x 154 cached tokens a layer's attention
took 1.1 ms against SDPA's 2.7 ms (about a fifth of a decoding step; fp32: 1.6 vs 1.7 ms).

Every switch comes from a `tunelab.speedups.SpeedupOptions` argument; each distinct options value is
registered under its own attention name, so variants never overwrite each other (bench/ compares them).
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tunelab.speedups import SpeedupOptions, active_autocast_dtype

PACKED_ATTENTION = "tunelab_packed"  # the name packed_attention is registered under for the default options
DEFAULT_OPTIONS = SpeedupOptions()


def pack_batch(inputs: dict[str, torch.Tensor], options: SpeedupOptions = DEFAULT_OPTIONS
               ) -> dict[str, torch.Tensor] | None:
    """A right-padded batch [B, T] as one padding-free row [1, N] (N = real tokens), samples in order.

    position_ids restart at 0 for every sample (as in the padded batch) and `cu_seq_lens_q` (transformers'
    name for sample boundaries, [B + 1] cumulative lengths) tells packed_attention where samples end. Each
    sample's first label becomes -100: in the packed row the token before it belongs to the previous
    sample (the padded batch never predicts a first token either). None when packing cannot be exact
    (left padding, inputs other than ids, mask and labels), is switched off, or gains nothing: a batch
    without padding is packed only on a CPU with rows short enough for the matmul attention (12% faster
    than SDPA on the dense batch there, bench/README.md); elsewhere SDPA on the dense batch is as fast and
    needs less memory.
    """
    mask = inputs.get("attention_mask")
    if not options.packing or mask is None or set(inputs) != {"input_ids", "attention_mask", "labels"}:
        return None
    if bool(mask.all()) and (not options.pack_dense or mask.device.type != "cpu"
                             or mask.shape[1] > options.matmul_max_len):
        return None
    mask = mask.bool()
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if not bool((mask == (positions < lengths[:, None])).all()):
        return None  # not right-padded: the padded batch's positions would not start at 0
    labels = inputs["labels"].clone()
    labels[:, 0] = -100
    cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return {"input_ids": inputs["input_ids"][mask][None], "labels": labels[mask][None],
            "position_ids": positions[mask][None], "cu_seq_lens_q": cu_seq_lens}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, options: SpeedupOptions = DEFAULT_OPTIONS, **kwargs):
    """Causal attention inside each sample of a packed row ([1, heads, N, head_dim], bounds in
    kwargs["cu_seq_lens_q"]); without bounds (unpacked batches, generation) transformers' SDPA attention,
    except a CPU decoding step (one query row), which `_decode_attention` computes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        if query.shape[2] == 1 and query.device.type == "cpu" and options.matmul_decode and not dropout \
                and kwargs.get("position_bias") is None:
            return _decode_attention(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    runs = equal_length_runs(lengths) if options.group_equal_lengths else [(n, 1) for n in lengths if n]
    sizes = [length * count for length, count in runs]
    cpu = query.device.type == "cpu"
    # split, not slices: one gradient concatenation in backward instead of a zero-filled full-size
    # gradient per piece and tensor (slicing's backward), which grew with the number of samples
    outputs = [_matmul_attention(q, k, v, scaling, dropout, count, options.softmax_dtype)
               if cpu and options.matmul_attention and length <= options.matmul_max_len
               else _sdpa_attention(q, k, v, scaling, dropout, count)
               for q, k, v, (length, count) in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                                                   value.split(sizes, dim=2), runs)]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, N, heads, head_dim] like SDPA's


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive samples of one length, as (length, count) in order; empty samples dropped.
    [256, 256, 90, 256] -> [(256, 2), (90, 1), (256, 1)]: each run is one batched attention call (a batch
    without padding is a single run), not one call per sample."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        elif length:
            runs.append((length, 1))
    return runs


def _samples_first(x: torch.Tensor, count: int) -> torch.Tensor:
    """[1, heads, count * L, head_dim] -> [count, heads, L, head_dim] (a view)."""
    return x.view(x.shape[1], count, -1, x.shape[3]).transpose(0, 1)


def _samples_joined(x: torch.Tensor) -> torch.Tensor:
    """[count, heads, L, head_dim] -> [1, heads, count * L, head_dim] (inverse of _samples_first)."""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])


def _sdpa_attention(query, key, value, scaling, dropout, count=1):
    """`count` equal-length samples' causal attention as one batched SDPA call."""
    out = F.scaled_dot_product_attention(_samples_first(query, count), _samples_first(key, count),
                                         _samples_first(value, count), dropout_p=dropout, is_causal=True,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return _samples_joined(out)


def _matmul_attention(query, key, value, scaling, dropout, count=1, softmax_dtype: torch.dtype | None = None):
    """The causal attention of `count` samples of one length L as two batched matmuls and a softmax computed
    in fp32 (transformers' eager attention; see SpeedupOptions.softmax_dtype). Grouped-query heads share their
    K/V head in the matmuls themselves — the queries of one K/V head and sample are stacked into one
    [groups * L, head_dim] matrix — instead of copying K and V per query head (repeat_kv) and summing the
    copies' gradients back; the scale and the causal mask ride in the first matmul (baddbmm's alpha and bias).
    Why by hand: on CPU, SDPA's flash kernel makes a whole LoRA training step on SmolLM2 ~11% slower than
    this for samples of <= 256 tokens (bench/README.md). The price is the [heads, L, L] probabilities kept
    for backward (~0.3 GB in bf16 there), hence only up to SpeedupOptions.matmul_max_len tokens per sample."""
    heads, head_dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
    length = query.shape[2] // count
    groups = heads // kv_heads  # query head h uses K/V head h // groups, as in repeat_kv
    mask = _causal_bias(length, groups, active_autocast_dtype(query.device) or query.dtype, query.device)
    # [1, kv_heads * groups, count * L, d] -> [kv_heads * count, groups * L, d]: one matrix per (K/V head, sample)
    q = query.reshape(kv_heads, groups, count, length, head_dim).transpose(1, 2)
    scores = torch.baddbmm(mask, q.reshape(kv_heads * count, groups * length, head_dim),
                           key.reshape(kv_heads * count, length, head_dim).transpose(1, 2),
                           alpha=head_dim ** -0.5 if scaling is None else scaling)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(scores.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.bmm(probs, value.reshape(kv_heads * count, length, head_dim))
    out = out.view(kv_heads, count, groups, length, head_dim).transpose(1, 2)  # [kv_heads, groups, count, L, d]
    return out.reshape(1, heads, count * length, head_dim)


def _decode_attention(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """One query row per sample ([B, heads, 1, d]) against the cache ([B, kv_heads, T, d]): scores, an fp32
    softmax and the weighted values as two batched matmuls, the query heads of one K/V head stacked into one
    [groups, d] matrix (no repeat_kv copies). `attention_mask`: transformers' SDPA mask ([B, 1, 1, T], True =
    attend, or additive floats) or None. Returns [B, 1, heads, d], the layout SDPA's path returns."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (head_dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, -key.shape[2]:]  # [B or 1, 1, 1, T]: broadcasts over the heads
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).view(batch, 1, heads, head_dim)


@functools.lru_cache(maxsize=64)
def _causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[groups * L, L] additive causal mask for `groups` stacked query blocks: 0 on and below each block's
    diagonal, -inf above (a normal tensor even when first asked for under inference_mode, so later training
    steps can use it)."""
    with torch.inference_mode(False):
        block = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
        return block.repeat(groups, 1)


def attention_name(options: SpeedupOptions) -> str:
    """The attention implementation name of `options`' packed attention: PACKED_ATTENTION for the
    defaults, a name of its own for any other options (so variants never overwrite each other's entry)."""
    if options == DEFAULT_OPTIONS:
        return PACKED_ATTENTION
    return f"{PACKED_ATTENTION}_{zlib.crc32(repr(options).encode()):08x}"


def enable_packed_attention(model, options: SpeedupOptions = DEFAULT_OPTIONS) -> str | None:
    """Switch the HF model in `model` (plain or peft-wrapped) from SDPA (or another options' packed
    attention) to `options`' packed attention when that is exact: a causal LM on transformers' attention
    interface, full attention in every layer (no sliding window, softcap or position bias). Returns the
    implementation to restore afterwards, or None when the model is left as it is (packing switched off,
    P-Tuning's prefix cache, eager/flash attention, remote code)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if not options.packing or not isinstance(hf, PreTrainedModel) \
            or not getattr(hf, "_supports_attention_backend", False) \
            or not (current == "sdpa" or str(current).startswith(PACKED_ATTENTION)):
        return None
    text = config.get_text_config()
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []) \
            or getattr(text, "attn_logit_softcapping", None) or getattr(text, "is_encoder_decoder", False):
        return None
    name = attention_name(options)
    AttentionInterface.register(name, _attention_function(options))
    AttentionMaskInterface.register(name, sdpa_mask)  # unpacked batches get SDPA's masks
    hf.set_attn_implementation(name)
    return current


@contextlib.contextmanager
def packed_attention_enabled(model, options: SpeedupOptions = DEFAULT_OPTIONS) -> Iterator[bool]:
    """enable_packed_attention for the block; yields whether batches may be packed (pack_batch), and puts
    the model's previous attention implementation back when the block ends."""
    restore = enable_packed_attention(model, options)
    try:
        yield restore is not None
    finally:
        if restore:
            _hf_model(model).set_attn_implementation(restore)


def flash_varlen(model, options: SpeedupOptions = DEFAULT_OPTIONS) -> bool:
    """Whether `model` runs transformers' flash_attention_2 (--attn_implementation), whose varlen kernel keeps
    the samples of a packed row apart by itself (position_ids restart at 0 per sample): pack_batch's rows go
    to it as they are, no attention of tunelab's is registered."""
    config = getattr(_hf_model(model), "config", None)
    return options.packing and getattr(config, "_attn_implementation", None) == "flash_attention_2"


@functools.lru_cache(maxsize=None)
def _attention_function(options: SpeedupOptions):
    """The function registered for `options`: the same object every time (re-registering changes nothing)."""
    return functools.partial(options.attention or packed_attention, options=options)


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model
