"""Batched generation for eval/predict: many prompts through `model.generate`, answers back in order.

    from tunelab.generation import generate_batched, generation_kwargs
    kwargs = generation_kwargs(args.generation, tokenizer)          # greedy unless --do_sample
    answers = generate_batched(model, tokenizer, prompt_ids, kwargs, batch_size=8, seed=42)

Batching must not change the answers: greedy decoding of a prompt gives the same text alone or in a
batch (tests/test_generation.py checks it against repeated full forward passes, in fp32; under bf16
autocast a different batch shape rounds differently, so a near-tie can flip a token). What makes that hold:
  * left padding plus an attention mask, so every row's new tokens sit at the same position;
  * a per-prompt token budget: `max_length` is prompt + answer for *that* prompt, not for the padded
    batch (HF counts padding), so the batch runs to the largest budget and each answer is cut to its own;
  * each answer is cut at its first eos id, whatever the batch appended after it.
Prompts are sorted longest first into batches (least padding; an out-of-memory shows on batch one): a fixed
number of rows, or as many as keep the batch's KV cache (rows x (longest prompt + new tokens)) within a token
budget (`max_batch_tokens`; --generation_batch_tokens). Decoding a step costs about one read of the weights
whatever the rows, so large batches are much faster on a CPU; their prompts are prefilled in chunks of similar
length (tunelab/prefill.py), so padding to the longest prompt costs no compute. 100 alpaca prompts, <= 64 new
tokens (`python -m bench.generate`, bench/README.md): batch 8 86.7 s, the default 31.0 s on the AVX2 class
(emulated, fp32); 43.0 s and 17.7 s (20.7 s with one prefill forward) on the AVX-512 BF16 class in bf16.
Where batching can still matter: sampled answers depend on which batch draws which random numbers (a
seed makes a run repeatable, not batch-size independent); beam search cut to a shorter per-prompt
budget is not beam search run with that budget; and HF's repetition_penalty also penalises the padding
ids it sees in the prompt (with the default 1.0 it is off).

`model` is anything whose `.generate(input_ids=..., attention_mask=..., **kw)` returns prompt + new
tokens as HF does: a plain HF model, a peft model or tunelab's P-Tuning wrapper.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.hparams import GenerationArguments


# the default generation batch (--generation_batch_tokens): its KV cache within this many bytes and tokens
KV_CACHE_BUDGET_BYTES = 1 << 30
MAX_BATCH_TOKENS = 16384
# a large batch's prompts are prefilled in chunks of about this many tokens, so that left padding to the
# longest prompt costs no compute (tunelab/prefill.py)
PREFILL_CHUNK_TOKENS = 1024


def batch_tokens(model, setting: int | None) -> int | None:
    """The KV-cache token budget of a generation batch: `setting` (--generation_batch_tokens; 0 = None, a fixed
    number of rows), or by default as many tokens as fit KV_CACHE_BUDGET_BYTES of cache (keys and values of every
    layer, in the weights' dtype), at most MAX_BATCH_TOKENS: SmolLM2-135M in fp32 holds 46 KB a token (16384
    tokens), a 7B Llama in fp32 1 MB (1024 tokens)."""
    import torch

    from tunelab.prefix import kv_shape

    if setting is not None:
        return setting or None
    config = getattr(model, "config", None)
    if config is None:
        return MAX_BATCH_TOKENS
    layers, kv_heads, head_dim = kv_shape(config)
    param = next(model.parameters(), None)
    size = param.element_size() if param is not None and param.is_floating_point() else torch.float32.itemsize
    return max(1, min(MAX_BATCH_TOKENS, KV_CACHE_BUDGET_BYTES // (layers * 2 * kv_heads * head_dim * size)))


def _ids(value) -> list[int]:
    """An eos/pad id setting (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generation_kwargs(gen: GenerationArguments, tokenizer) -> dict[str, Any]:
    """HF `generate` keyword arguments for these options: greedy unless `do_sample`.

    Sampling knobs are passed only when sampling (HF warns about them otherwise); `max_length` (prompt +
    answer) replaces `max_new_tokens` when set. The model's own generation_config eos ids are added by
    generate_batched, which has the model.
    """
    if gen.num_beams < 1:
        raise TunelabError(f"--num_beams must be >= 1, got {gen.num_beams}")
    if gen.do_sample and gen.temperature <= 0:
        raise TunelabError(f"--temperature must be > 0 when sampling, got {gen.temperature}")
    kwargs: dict[str, Any] = {"do_sample": gen.do_sample, "num_beams": gen.num_beams,
                              "repetition_penalty": gen.repetition_penalty, "use_cache": True}
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    if gen.max_length is not None:
        if gen.max_length < 1:
            raise TunelabError(f"--max_length must be >= 1, got {gen.max_length}")
        kwargs["max_length"] = gen.max_length
    else:
        if gen.max_new_tokens < 1:
            raise TunelabError(f"--max_new_tokens must be >= 1, got {gen.max_new_tokens}")
        kwargs["max_new_tokens"] = gen.max_new_tokens
    eos = _ids(tokenizer.eos_token_id)
    if eos:
        kwargs["eos_token_id"] = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def _model_generation_config(model):
    # peft models and HF models expose it directly; a wrapper (P-Tuning) may only hold the HF model
    for candidate in (model, getattr(model, "model", None), getattr(model, "base_model", None)):
        config = getattr(candidate, "generation_config", None)
        if config is not None:
            return config
    return None


def _resolve_kwargs(model, tokenizer, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """gen_kwargs + the model's eos ids (chat models often stop on several) + a pad id that always exists."""
    kwargs = dict(gen_kwargs)
    config = _model_generation_config(model)
    eos = _ids(kwargs.get("eos_token_id", tokenizer.eos_token_id))
    eos += [i for i in _ids(getattr(config, "eos_token_id", None)) if i not in eos]
    if eos:
        kwargs["eos_token_id"] = eos
    if kwargs.get("pad_token_id") is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        if pad is None:
            raise TunelabError("the tokenizer has neither a pad nor an eos token: cannot pad a batch")
        kwargs["pad_token_id"] = pad
    kwargs.setdefault("use_cache", True)
    return kwargs


def _budgets(prompts: list[list[int]], kwargs: dict[str, Any], model) -> list[int]:
    """New-token budget per prompt. `max_length` is per prompt (total), else `max_new_tokens`; with
    neither, the model's generation_config decides the same way."""
    max_length, max_new = kwargs.get("max_length"), kwargs.get("max_new_tokens")
    if max_length is None and max_new is None:
        config = _model_generation_config(model)
        max_new = getattr(config, "max_new_tokens", None)
        max_length = getattr(config, "max_length", None) if max_new is None else None
        if max_new is None and max_length is None:
            raise TunelabError("give max_new_tokens or max_length for generation")
    if max_length is not None and max_new is None:
        return [max_length - len(p) for p in prompts]
    return [max_new] * len(prompts)  # both given: HF lets max_new_tokens win, so do we


def _left_pad(prompts: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) [batch, longest], prompts right-aligned so new tokens line up."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return input_ids, mask


def plan_batches(order: list[int], prompt_lens: list[int], budgets: list[int], batch_size: int,
                 max_batch_tokens: int | None = None) -> list[list[int]]:
    """Consecutive batches of `order` (prompts longest first): `batch_size` rows each, or, with
    `max_batch_tokens`, as many rows as keep rows x (longest prompt + largest new-token budget) -- the KV
    cache a batch holds -- within it (always at least one row). Longest first, so a batch's first row sets
    its width and an out-of-memory shows on batch one."""
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch is not None and _fits(batch + [i], prompt_lens, budgets, batch_size, max_batch_tokens):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def _fits(batch: list[int], prompt_lens: list[int], budgets: list[int], batch_size: int,
          max_batch_tokens: int | None) -> bool:
    if max_batch_tokens is None:
        return len(batch) <= batch_size
    width = max(prompt_lens[i] for i in batch) + max(budgets[i] for i in batch)
    return len(batch) * width <= max_batch_tokens


def cut_at_end(tokens: list[int], end_ids) -> tuple[list[int], bool]:
    """(the tokens before the first end id, whether one was found): an answer ends at its first end token,
    whatever follows it (padding in a batch)."""
    for pos, token in enumerate(tokens):
        if token in end_ids:
            return tokens[:pos], True
    return tokens, False


def _generate_batch(model, tokenizer, prompts: list[list[int]], budgets: list[int],
                    kwargs: dict[str, Any], device, prefill_chunk_tokens: int | None,
                    pieces: list | None = None) -> tuple[list[str], list[int]]:
    """The batch's answers, and the real prompt tokens the model ran for each (1 per row on `pieces`)."""
    from tunelab import prefill

    input_ids, mask = _left_pad(prompts, kwargs["pad_token_id"])
    input_ids, mask = input_ids.to(device), mask.to(device)
    cache, ran = None, [len(p) for p in prompts]
    if prefill.applies(model, kwargs):
        if pieces is not None and input_ids.shape[1] > 1:  # the likelihood pass's prompt cache
            cache, ran = prefill.stacked_cache(model, pieces, input_ids.shape[1] - 1), [1] * len(prompts)
        elif prefill_chunk_tokens is not None:
            cache = prefill.chunked_prefill(model, input_ids, mask, prefill_chunk_tokens)
    if cache is not None:
        kwargs = {**kwargs, prefill.generate_cache_kwarg(model): cache}
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(budgets), **kwargs)
    out = getattr(out, "sequences", out)  # a generation_config with return_dict_in_generate
    new_tokens = out[:, input_ids.shape[1]:].tolist()
    eos = _ids(kwargs.get("eos_token_id"))
    # each row up to its own budget, then to its first eos
    return [tokenizer.decode(cut_at_end(row[:budget], eos)[0], skip_special_tokens=True).strip()
            for row, budget in zip(new_tokens, budgets)], ran


def _cached_prompts(prompt_cache, batch: list[int]) -> list | None:
    """Every row's prompt keys/values from `prompt_cache` (taken: freed there), or None when a row has none."""
    if prompt_cache is None:
        return None
    pieces = [prompt_cache.take(i) for i in batch]
    return pieces if all(p is not None for p in pieces) else None


def _device(model):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def generate_batched(model, tokenizer, prompts: list[list[int]], gen_kwargs: dict[str, Any],
                     batch_size: int = 8, progress: bool = True, seed: int | None = None,
                     autocast_dtype=None, cast_weights_once: bool = True,
                     max_batch_tokens: int | None = None,
                     prefill_chunk_tokens: int | None = PREFILL_CHUNK_TOKENS, prompt_cache=None,
                     stats: dict[str, int] | None = None, speedups=None) -> list[str]:
    """The decoded answer to each prompt (token ids), in the order given; "" where the prompt alone
    already fills `max_length`. `seed` seeds torch once before the first batch (for sampling). Under
    autocast (`autocast_dtype`, or an autocast block around the call) the linear weights are cast once
    for the whole call (tunelab.speedups.py; same answers, faster decoding), and decoding steps run tunelab's
    attention (tunelab/attention.py: on a CPU one query row as two matmuls, not SDPA; `speedups`, a
    tunelab.speedups.SpeedupOptions, switches that off for bench/). Batches: `batch_size` prompts, or
    with `max_batch_tokens` as many as fit that KV-cache budget (plan_batches); their prompts prefilled in chunks
    of about `prefill_chunk_tokens` (tunelab/prefill.py; None: one forward per batch, HF generate's own), or
    taken from `prompt_cache` (a tunelab.prefill.PromptCache, positions = prompts) where it holds every row's.
    `stats["prompt_tokens_each"]` (when given) counts the real prompt tokens this call ran through the model per
    prompt, in the order given: all of a prompt's, or only its last one when its keys/values came from
    `prompt_cache` (the study's FLOPs); 0 for a prompt not run."""
    import torch

    from tunelab.attention import DEFAULT_OPTIONS, packed_attention_enabled
    from tunelab.logs import progress as progress_bar
    from tunelab.speedups import active_autocast_dtype, linear_weights_cast

    if batch_size < 1:
        raise TunelabError(f"batch size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise TunelabError(f"prompt {next(i for i, p in enumerate(prompts) if not p)} is empty: nothing to continue")
    kwargs = _resolve_kwargs(model, tokenizer, gen_kwargs)
    budgets = _budgets(prompts, kwargs, model)
    # each batch gets max_new_tokens = its largest budget instead (see _generate_batch)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("max_length", "max_new_tokens")}
    answers = [""] * len(prompts)
    order = sorted((i for i in range(len(prompts)) if budgets[i] > 0), key=lambda i: -len(prompts[i]))
    device, was_training = _device(model), model.training
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    bar = progress_bar(total=len(prompts), desc="generate", unit="sample", disable=not progress)
    bar.update(len(prompts) - len(order))
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype), \
                packed_attention_enabled(model, speedups or DEFAULT_OPTIONS), \
                linear_weights_cast(model, active_autocast_dtype(device) if cast_weights_once else None):
            lens = [len(p) for p in prompts]
            for batch in plan_batches(order, lens, budgets, batch_size, max_batch_tokens):
                texts, ran = _generate_batch(model, tokenizer, [prompts[i] for i in batch],
                                             [budgets[i] for i in batch], kwargs, device, prefill_chunk_tokens,
                                             _cached_prompts(prompt_cache, batch))
                if stats is not None:
                    each = stats.setdefault("prompt_tokens_each", [0] * len(prompts))
                    for i, tokens in zip(batch, ran):
                        each[i] = tokens
                for i, text in zip(batch, texts):
                    answers[i] = text
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return answers
