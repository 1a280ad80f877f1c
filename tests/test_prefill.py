"""Chunked prefill (tunelab/prefill.py): generation from a cache built chunk by chunk gives exactly the tokens
of HF's own prefill and of repeated full forward passes (fp32, tiny models); it steps aside where it does not
apply; generation batches by KV-cache token budget (tunelab.generation.plan_batches)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab import generation, prefill
from tunelab.generation import generate_batched, generation_kwargs, plan_batches
from tunelab.hparams import GenerationArguments

# the cached tiny models, and the one-thread fixture (autouse: importing it applies it here too)
from tests.test_generation import _model, _one_torch_thread, greedy_reference  # noqa: F401

TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog. Eat well and sleep", "问：答：",
         "Give three tips for staying healthy.", "凉宫春日的忧郁", "A much longer prompt, so that chunks of similar "
         "length differ from the longest one by many tokens"]


def _prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS] + [[tokenizer.convert_tokens_to_ids("a")]]
    assert len({len(p) for p in prompts}) == len(prompts) and min(map(len, prompts)) == 1
    return prompts


def _generate(model, tokenizer, prompts, chunk_tokens, monkeypatch, calls=None, **gen):
    """One budgeted batch (every prompt), prefilled in chunks of `chunk_tokens`; `calls` counts the chunks."""
    if calls is not None:
        real = prefill._forward_cache
        monkeypatch.setattr(prefill, "_forward_cache", lambda *a: calls.append(a[1].shape) or real(*a))
    kwargs = generation_kwargs(GenerationArguments(max_new_tokens=10, **gen), tokenizer)
    return generate_batched(model, tokenizer, prompts, kwargs, batch_size=1, progress=False, max_batch_tokens=10**6,
                            seed=0, prefill_chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_chunked_prefill_equals_hf_prefill_and_full_forward(tiny_model_factory, tiny_tokenizer, arch, monkeypatch):
    model = _model(tiny_model_factory(arch))
    prompts = _prompts(tiny_tokenizer)
    calls = []
    chunked = _generate(model, tiny_tokenizer, prompts, 24, monkeypatch, calls)
    assert len(calls) >= 3  # several chunks ran (the one-token prompt's chunk needs no forward)
    whole = _generate(model, tiny_tokenizer, prompts, None, monkeypatch)  # HF's own prefill
    assert chunked == whole
    eos = [tiny_tokenizer.eos_token_id]
    reference = [tiny_tokenizer.decode(greedy_reference(model, p, 10, eos), skip_special_tokens=True).strip()
                 for p in prompts]
    assert chunked == reference and any(reference)


def test_lora_model_and_sampling(tiny_llama_dir, tiny_tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = _prompts(tiny_tokenizer)
    calls = []
    assert _generate(model, tiny_tokenizer, prompts, 24, monkeypatch, calls) == \
        _generate(model, tiny_tokenizer, prompts, None, monkeypatch)
    assert calls
    sampled = [_generate(model, tiny_tokenizer, prompts, chunk, monkeypatch, do_sample=True, top_k=0, top_p=1.0)
               for chunk in (24, None)]  # the same seed draws the same numbers over the same logits
    assert sampled[0] == sampled[1]


def test_steps_aside_where_it_does_not_apply(tiny_llama_dir, tiny_tokenizer):
    from tunelab.prefix import PrefixModel

    model = _model(tiny_llama_dir)
    assert prefill.applies(model, {"num_beams": 1})
    assert not prefill.applies(model, {"num_beams": 2})
    assert not prefill.applies(model, {"num_return_sequences": 3})
    assert not prefill.applies(PrefixModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), pre_seq_len=2), {})
    assert not prefill.applies(torch.nn.Linear(2, 2), {})  # not an HF model
    ids = torch.tensor([[0, 5, 6], [0, 0, 7]])
    mask = (ids != 0).long()
    assert prefill.chunked_prefill(model, ids, mask, 10**6) is None  # one chunk: nothing to gain
    assert prefill.chunked_prefill(model, ids.flip(0), mask.flip(0), 2) is None  # not longest first


def test_chunk_rows():
    assert prefill.chunk_rows([5, 4, 4, 2, 1], 10) == [range(0, 2), range(2, 4), range(4, 5)]
    assert prefill.chunk_rows([30, 2], 10) == [range(0, 1), range(1, 2)]  # a row wider than the budget: alone
    assert prefill.chunk_rows([3], 10) == [range(0, 1)]


def test_plan_batches_by_rows_or_kv_cache_tokens():
    lens, budgets = [9, 7, 5, 3, 1], [4, 4, 4, 4, 4]
    order = [0, 1, 2, 3, 4]
    assert plan_batches(order, lens, budgets, 2) == [[0, 1], [2, 3], [4]]
    # rows x (longest prompt + new tokens) <= 30: 2 x 13, then 3 x 9 fits (and a 4th would not), then 1 row
    assert plan_batches(order, lens, budgets, 2, max_batch_tokens=30) == [[0, 1], [2, 3, 4]]
    assert plan_batches(order, lens, budgets, 2, max_batch_tokens=5) == [[0], [1], [2], [3], [4]]  # >= 1 row
    assert plan_batches([], [], [], 2, max_batch_tokens=30) == []


def test_batch_tokens_default_fits_the_kv_cache_budget(tiny_llama_dir, monkeypatch):
    from tunelab.prefix import kv_shape

    model = _model(tiny_llama_dir)
    assert generation.batch_tokens(model, 0) is None  # 0: a fixed number of rows
    assert generation.batch_tokens(model, 500) == 500
    assert generation.batch_tokens(model, None) == generation.MAX_BATCH_TOKENS  # a tiny model's cache is small
    layers, kv_heads, head_dim = kv_shape(model.config)
    per_token = layers * 2 * kv_heads * head_dim * 4  # fp32 weights
    monkeypatch.setattr(generation, "KV_CACHE_BUDGET_BYTES", 100 * per_token + 1)
    assert generation.batch_tokens(model, None) == 100
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)  # not the shared model:
    assert generation.batch_tokens(bf16, None) == 200                                 # a cast would round it


def _first_forward_widths(model):
    """Input widths of the model's forwards (a hook), to see which tokens generation ran."""
    widths = []
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = target.register_forward_pre_hook(lambda m, a, kw: widths.append((kw.get("input_ids") if kw.get(
        "input_ids") is not None else a[0]).shape[1]), with_kwargs=True)
    return widths, handle


@pytest.mark.parametrize("lora", [False, True])
def test_the_likelihood_pass_prompt_cache_serves_generation(tiny_llama_dir, tiny_tokenizer, lora):
    """Likelihood pass over prompt + reference keeps each prompt's keys/values; generation from them gives the
    tokens of generation from scratch, runs one column per step (no prefill), and scores are unchanged."""
    from tunelab.likelihood import score_rows

    model = _model(tiny_llama_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts = _prompts(tiny_tokenizer)[:-1]
    answers = [tiny_tokenizer(f" answer {i} " * (i + 1))["input_ids"] for i in range(len(prompts))]
    rows = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
    cache = prefill.PromptCache({i: len(p) for i, p in enumerate(prompts) if i != 2}, 1 << 30)  # 2 not wanted
    with torch.inference_mode():
        plain, _ = score_rows(model, rows, tiny_tokenizer, 2)
        shared, _ = score_rows(model, rows, tiny_tokenizer, 2, prompt_cache=cache)
    assert torch.allclose(plain.nll_sum, shared.nll_sum, atol=1e-5)
    kwargs = generation_kwargs(GenerationArguments(max_new_tokens=8), tiny_tokenizer)
    wanted = [i for i in range(len(prompts)) if i != 2]
    scratch = generate_batched(model, tiny_tokenizer, [prompts[i] for i in wanted], kwargs, progress=False,
                               max_batch_tokens=10**6)
    widths, handle = _first_forward_widths(model)
    try:
        from_cache = generate_batched(model, tiny_tokenizer, [prompts[i] for i in wanted], kwargs, progress=False,
                                      max_batch_tokens=10**6, prompt_cache=cache.view(wanted))
    finally:
        handle.remove()
    assert from_cache == scratch and any(scratch)
    assert set(widths) == {1}  # every forward ran one column: the prompts came from the pass
    assert all(cache.take(i) is None for i in range(len(prompts)))  # taken (freed) by generation


def test_prompt_cache_budget_and_fallback(tiny_llama_dir, tiny_tokenizer):
    """Past max_bytes (checked before each batch) no more prompts are kept; a batch with a row missing prefills
    as usual, with the same answers."""
    from tunelab.likelihood import score_rows

    model = _model(tiny_llama_dir)
    prompts = _prompts(tiny_tokenizer)[:4]
    rows = [{"input_ids": p + [5, 6], "labels": [-100] * len(p) + [5, 6]} for p in prompts]
    cache = prefill.PromptCache({i: len(p) for i, p in enumerate(prompts)}, max_bytes=1)
    with torch.inference_mode():
        score_rows(model, rows, tiny_tokenizer, 1, prompt_cache=cache)  # checked before each batch
    kept = [i for i in range(4) if cache.view(list(range(4))).prompt_len(i) is None]
    assert len(kept) == 4 and sum(cache._store.get(i) is not None for i in range(4)) == 1  # the first, then full
    kwargs = generation_kwargs(GenerationArguments(max_new_tokens=6), tiny_tokenizer)
    assert generate_batched(model, tiny_tokenizer, prompts, kwargs, progress=False, max_batch_tokens=10**6,
                            prompt_cache=cache) == \
        generate_batched(model, tiny_tokenizer, prompts, kwargs, progress=False, max_batch_tokens=10**6)


def test_chained_prompt_caches_map_positions_to_each_sets_own_cache():
    """Two sets' caches end to end (a joint generation): position j reaches the part it falls in, through views
    (a shard of the whole) too; a part without a cache gives None; a position past the end is an error."""
    piece = [(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))]
    first = prefill.PromptCache({0: 3, 2: 3}, 1 << 30)
    second = prefill.PromptCache({1: 3}, 1 << 30)
    for cache, index in ((first, 0), (first, 2), (second, 1)):
        cache.add(index, piece)
    # set one generates its samples 0 and 2, set two its sample 1, a third set has no cache
    chained = prefill.ChainedPromptCaches([(first.view([0, 2]), 2), (second.view([1]), 1), (None, 2)])
    shard = chained.view([1, 2, 3])  # the whole's positions 1, 2, 3
    assert shard.take(0) is not None and first.take(2) is None  # position 1 = set one's sample 2, taken
    assert shard.take(1) is not None and second.take(1) is None  # position 2 = set two's sample 1
    assert shard.take(2) is None                                 # position 3: the set without a cache
    assert chained.take(0) is not None and chained.take(0) is None  # taken once
    with pytest.raises(IndexError):
        chained.take(5)
