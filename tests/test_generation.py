"""Batched generation (tunelab/generation.py) gives exactly what one prompt at a time gives, which is
exactly the argmax of repeated full forward passes; answers keep the prompts' order; budgets and eos
lists are honoured; sampling with a seed repeats. Random tiny models generate junk, deterministically."""

import copy
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.generation import cut_at_end, generate_batched, generation_kwargs
from tunelab.hparams import GenerationArguments, TunelabError

TEXTS = ["Hello", "你好，今天天气怎么样？我很好", "The quick brown fox jumps over the lazy dog. Eat well",
         "问：答：", "Give three tips for staying healthy.", "凉宫春日"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box torch's threads fight other
    jobs: this file takes ~5 s on one thread and ~85 s on two while something else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _model(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: padding is exercised
    return prompts


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Ground truth: argmax of a full forward pass over the whole sequence each step, no cache, no batch."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in eos_ids:
                break
            ids.append(token)
    return ids[len(prompt_ids):]


def _greedy(max_new_tokens=10, **extra):
    return GenerationArguments(max_new_tokens=max_new_tokens, **extra)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "glm"])
def test_batched_greedy_equals_single_and_full_forward(tiny_model_factory, tiny_tokenizer, arch):
    model = _model(tiny_model_factory(arch))
    prompts = _prompts(tiny_tokenizer)
    kwargs = generation_kwargs(_greedy(12), tiny_tokenizer)
    batched = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=4, progress=False)
    single = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=1, progress=False)
    assert batched == single
    eos = [tiny_tokenizer.eos_token_id]
    reference = [tiny_tokenizer.decode(greedy_reference(model, p, 12, eos), skip_special_tokens=True).strip()
                 for p in prompts]
    assert batched == reference
    assert any(reference)  # the junk is not all empty, so the comparison means something


def test_peft_model_and_bf16_autocast(tiny_llama_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = _prompts(tiny_tokenizer)
    kwargs = generation_kwargs(_greedy(8), tiny_tokenizer)
    batched = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=4, progress=False)
    assert batched == generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=1, progress=False)
    # bf16 is the eval caller's choice on fast-bf16 CPUs: it runs and keeps one answer per prompt
    # (not compared token for token: bf16 rounding may flip a near-tie argmax)
    bf16 = generate_batched(model, tiny_tokenizer, prompts, kwargs, progress=False, autocast_dtype=torch.bfloat16)
    assert len(bf16) == len(prompts) and all(isinstance(a, str) for a in bf16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_model_batched_equals_single(tiny_model_factory, tiny_tokenizer, arch):
    from tunelab.prefix import PrefixModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32)
    model = PrefixModel(base, pre_seq_len=4)
    with torch.no_grad():  # move the prefix off its init so it changes the answers
        for param in model.encoder.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param, generator=torch.Generator().manual_seed(0)) * 0.5)
    prompts = _prompts(tiny_tokenizer)
    kwargs = generation_kwargs(_greedy(10), tiny_tokenizer)
    batched = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=4, progress=False)
    assert batched == generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=1, progress=False)
    assert batched != generate_batched(base, tiny_tokenizer, prompts, kwargs, batch_size=4, progress=False)


class _EchoModel(torch.nn.Module):
    """Stands in for any `.generate` following HF's convention (prompt + new tokens): each row continues
    with its own last real prompt token, `max_new_tokens` times, never stopping early."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append(input_ids.shape)
        assert (attention_mask[:, -1] == 1).all()  # left padded
        new = input_ids[:, -1:].repeat(1, max_new_tokens)
        return torch.cat([input_ids, new], dim=1)


def test_order_kept_and_batches_sorted_longest_first(tiny_tokenizer):
    model = _EchoModel()
    prompts = [[50], [60, 61, 62], [70, 71]]
    kwargs = {"max_new_tokens": 2, "eos_token_id": [tiny_tokenizer.eos_token_id]}
    answers = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=2, progress=False)
    assert answers == [tiny_tokenizer.decode([p[-1]] * 2).strip() for p in prompts]
    assert [tuple(s) for s in model.calls] == [(2, 3), (1, 1)]  # [60..62]+[70,71], then [50]


def test_max_length_is_per_prompt_total(tiny_tokenizer):
    model = _EchoModel()
    prompts = [[50], [60, 61, 62], [70, 71, 72, 73, 74, 75]]
    kwargs = generation_kwargs(_greedy(max_length=5), tiny_tokenizer)
    assert kwargs["max_length"] == 5 and "max_new_tokens" not in kwargs  # max_length wins
    answers = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=3, progress=False)
    # 5 - prompt length new tokens each, even though the batch ran to the largest budget; the prompt
    # longer than max_length gets "" and is never sent
    assert answers == [tiny_tokenizer.decode([50] * 4).strip(), tiny_tokenizer.decode([62] * 2).strip(), ""]
    assert [tuple(s) for s in model.calls] == [(2, 3)]


def test_max_length_matches_single_prompt_runs(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir)
    prompts = _prompts(tiny_tokenizer)
    kwargs = generation_kwargs(_greedy(max_length=24), tiny_tokenizer)
    batched = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=6, progress=False)
    assert max(len(p) for p in prompts) >= 24  # one prompt alone fills max_length: its answer is ""
    for prompt, answer in zip(prompts, batched):
        if len(prompt) >= 24:
            assert answer == ""
            continue
        alone = generation_kwargs(_greedy(max_new_tokens=24 - len(prompt)), tiny_tokenizer)
        assert generate_batched(model, tiny_tokenizer, [prompt], alone, progress=False) == [answer]


def test_stops_at_any_eos_of_the_model_generation_config(tiny_llama_dir, tiny_tokenizer):
    model = copy.deepcopy(_model(tiny_llama_dir))
    prompt = _prompts(tiny_tokenizer)[1]
    eos = tiny_tokenizer.eos_token_id
    tokens = greedy_reference(model, prompt, 10, [eos])
    stop = next(t for t in tokens[2:] if t not in tokens[:2])  # a token first generated at step >= 2
    model.generation_config.eos_token_id = [eos, stop]  # chat models often stop on several ids
    answer = generate_batched(model, tiny_tokenizer, [prompt], generation_kwargs(_greedy(10), tiny_tokenizer),
                              progress=False)
    assert answer == [tiny_tokenizer.decode(tokens[:tokens.index(stop)], skip_special_tokens=True).strip()]


def test_tokenizer_without_pad_token_pads_with_eos(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir)
    prompts = _prompts(tiny_tokenizer)
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    kwargs = generation_kwargs(_greedy(8), no_pad)
    assert kwargs["pad_token_id"] == no_pad.eos_token_id
    with_pad = generate_batched(model, tiny_tokenizer, prompts, generation_kwargs(_greedy(8), tiny_tokenizer),
                                batch_size=3, progress=False)
    assert generate_batched(model, no_pad, prompts, kwargs, batch_size=3, progress=False) == with_pad


def test_sampling_with_seed_repeats(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir)
    prompts = _prompts(tiny_tokenizer)
    kwargs = generation_kwargs(GenerationArguments(do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
                                                   max_new_tokens=10), tiny_tokenizer)

    def run(seed):
        return generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=3, progress=False, seed=seed)

    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_generation_kwargs(tiny_tokenizer):
    greedy = generation_kwargs(GenerationArguments(), tiny_tokenizer)
    assert greedy == {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "use_cache": True,
                      "max_new_tokens": 256, "eos_token_id": [tiny_tokenizer.eos_token_id],
                      "pad_token_id": tiny_tokenizer.pad_token_id}
    sampled = generation_kwargs(GenerationArguments(do_sample=True, top_k=20), tiny_tokenizer)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.95, 0.7, 20)
    with pytest.raises(TunelabError, match="num_beams"):
        generation_kwargs(GenerationArguments(num_beams=0), tiny_tokenizer)
    with pytest.raises(TunelabError, match="max_new_tokens"):
        generation_kwargs(GenerationArguments(max_new_tokens=0), tiny_tokenizer)


def test_restores_training_mode_and_rejects_bad_input(tiny_tokenizer):
    model = _EchoModel().train()
    assert generate_batched(model, tiny_tokenizer, [], {"max_new_tokens": 1}, progress=False) == []
    assert model.training
    with pytest.raises(TunelabError, match="prompt 1 is empty"):
        generate_batched(model, tiny_tokenizer, [[5], []], {"max_new_tokens": 1}, progress=False)
    with pytest.raises(TunelabError, match="batch size"):
        generate_batched(model, tiny_tokenizer, [[5]], {"max_new_tokens": 1}, batch_size=0, progress=False)


@pytest.mark.parametrize("tokens, ends, expected", [
    ([5, 6, 2, 7, 2], [2], ([5, 6], True)),          # cut at the first end token, padding after it dropped
    ([5, 6, 7], [2], ([5, 6, 7], False)),             # no end token: the whole budget
    ([3, 5, 2], [2, 3], ([], True)),                  # any of several end ids; an answer may be empty
    ([], [2], ([], False)),
])
def test_cut_at_end(tokens, ends, expected):
    assert cut_at_end(tokens, ends) == expected
