"""tunelab.attention: a packed batch gives the padded batch's loss and gradients through either kernel, the
matmul kernel's softmax equals transformers' fp32 one, and every variant reaches the kernel as an argument
(SpeedupOptions), each under its own attention name, never by rebinding a module global."""

import dataclasses

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from tests.test_generation import greedy_reference
from tunelab.attention import (DEFAULT_OPTIONS, PACKED_ATTENTION, _matmul_attention, attention_name,
                               enable_packed_attention, equal_length_runs, pack_batch, packed_attention,
                               packed_attention_enabled)
from tunelab.speedups import SpeedupOptions
from tunelab.trainer import supervised_loss


def padded_batch(vocab: int, lengths=(12, 7, 10), prompt: int = 4):
    """Right-padded batch: prompts masked with -100, padding masked in labels and attention."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


KERNELS = {"matmul": DEFAULT_OPTIONS, "sdpa": SpeedupOptions(matmul_attention=False),
           "per_sample": SpeedupOptions(group_equal_lengths=False)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "glm"])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("lengths", [(12, 7, 10), (9, 9, 5, 9, 9, 9)], ids=["distinct", "equal-runs"])
def test_packed_loss_and_grads_equal_padded_full_logits(tiny_model_factory, arch, kernel, lengths):
    options = KERNELS[kernel]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()  # eval: no dropout
    batch = padded_batch(model.config.vocab_size, lengths)
    plain = model(**batch).loss
    plain_grads = torch.autograd.grad(plain, list(model.parameters()), allow_unused=True)
    assert enable_packed_attention(model, options) == "sdpa"
    assert model.config._attn_implementation == attention_name(options)
    packed_inputs = pack_batch(batch, options)
    assert packed_inputs["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    packed = supervised_loss(model, packed_inputs, options)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    assert torch.allclose(packed, plain, atol=1e-5), (packed, plain)
    for a, b in zip(plain_grads, packed_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert torch.allclose(supervised_loss(model, batch), plain, atol=1e-5)  # unpacked batches: plain SDPA


def test_packed_matmul_attention_under_bf16_autocast_and_after_inference_mode(tiny_llama_dir):
    """The causal mask is cached per (length, dtype): one first made under inference_mode (an eval pass)
    still serves training steps, and under bf16 autocast the packed loss stays the padded one's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batch = padded_batch(model.config.vocab_size, lengths=(13, 6, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(**batch).loss
    enable_packed_attention(model)
    packed_inputs = pack_batch(batch)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = supervised_loss(model, packed_inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = supervised_loss(model, packed_inputs)
    packed.backward()
    assert torch.equal(first, packed.detach())
    assert torch.allclose(packed, plain, atol=2e-2), (packed, plain)  # bf16 noise
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_matmul_attention_probabilities_are_the_fp32_softmax_rounded_once():
    """softmax_dtype None (the scores' bf16) gives bit-identical outputs to transformers' fp32 softmax + cast,
    and gradients within bf16 rounding of it; two equal-length samples in one call equal two calls."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 2 * 7, 8, generator=g).requires_grad_() for heads in (4, 2, 2))

    def run(dtype, count):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pieces = zip(q.split(7 * count, 2), k.split(7 * count, 2), v.split(7 * count, 2))
            out = torch.cat([_matmul_attention(*p, None, 0.0, count, dtype) for p in pieces], dim=2)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out, grads

    out, grads = run(None, 2)
    ref_out, ref_grads = run(torch.float32, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert torch.equal(run(None, 1)[0], out)  # one batched call == one call per sample


def test_softmax_dtype_option_reaches_the_kernel_and_leaves_the_default_entry_alone(tiny_llama_dir):
    """A non-default softmax dtype, passed as an argument, changes the packed loss (a bf16 softmax on fp32
    scores rounds); the default options' registered attention is untouched, so a second model on the
    defaults still computes the default loss."""
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batch = pack_batch(padded_batch(ours.config.vocab_size))
    enable_packed_attention(ours)
    default_entry = AttentionInterface()[PACKED_ATTENTION]
    with torch.no_grad():
        default = supervised_loss(ours, batch)
        options = SpeedupOptions(softmax_dtype=torch.bfloat16)
        with packed_attention_enabled(other, options) as packing:
            assert packing and other.config._attn_implementation == attention_name(options) != PACKED_ATTENTION
            rounded = supervised_loss(other, batch, options)
            assert torch.equal(supervised_loss(ours, batch), default)  # both registered side by side
        assert other.config._attn_implementation == "sdpa"  # put back when the block ends
    assert AttentionInterface()[PACKED_ATTENTION] is default_entry
    assert not torch.equal(rounded, default) and torch.allclose(rounded, default, atol=2e-2)


def test_packing_switched_off_leaves_the_model_on_sdpa(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    off = SpeedupOptions(packing=False)
    with packed_attention_enabled(model, off) as packing:
        assert not packing and model.config._attn_implementation == "sdpa"
    assert pack_batch(padded_batch(50), off) is None


def test_attention_names_are_distinct_per_options_and_stable():
    variants = [DEFAULT_OPTIONS, SpeedupOptions(softmax_dtype=torch.float32), SpeedupOptions(matmul_attention=False),
                SpeedupOptions(group_equal_lengths=False), SpeedupOptions(matmul_max_len=64)]
    names = [attention_name(o) for o in variants]
    assert names[0] == PACKED_ATTENTION and len(set(names)) == len(names)
    assert attention_name(dataclasses.replace(DEFAULT_OPTIONS, softmax_dtype=torch.float32)) == names[1]


def test_equal_length_runs():
    assert equal_length_runs([256, 256, 90, 256]) == [(256, 2), (90, 1), (256, 1)]
    assert equal_length_runs([5, 0, 5, 5, 0]) == [(5, 3)]  # empty samples vanish from the packed row
    assert equal_length_runs([0, 3]) == [(3, 1)]
    assert equal_length_runs([]) == []


def test_pack_batch_only_when_exact_and_useful():
    batch = padded_batch(50)
    packed = pack_batch(batch)
    assert packed["position_ids"].tolist() == [list(range(12)) + list(range(7)) + list(range(10))]
    assert packed["cu_seq_lens_q"].tolist() == [0, 12, 19, 29]
    assert (packed["labels"][0, [0, 12, 19]] == -100).all()  # no sample predicts the previous sample's token
    full = {k: v[:1] for k, v in batch.items()}  # no padding: packed only for the CPU's matmul attention
    assert pack_batch(full)["cu_seq_lens_q"].tolist() == [0, 12]
    assert pack_batch(full, SpeedupOptions(matmul_max_len=11)) is None  # longer rows: SDPA on the dense batch
    assert pack_batch(full, SpeedupOptions(pack_dense=False)) is None
    assert pack_batch(batch, SpeedupOptions(matmul_max_len=11, pack_dense=False)) is not None  # padding: always
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert pack_batch(left) is None  # left padding: positions would differ
    assert pack_batch({**batch, "token_type_ids": batch["input_ids"]}) is None


class _Heads(torch.nn.Module):
    """What transformers' SDPA attention reads off an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_decode_attention_equals_sdpa(dtype, atol, mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 5, 6, 2, 11, 8
    query = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
    attend = torch.arange(length)[None] >= torch.tensor([0, 3, 7, 1, 10])[:, None]  # left padding per row
    mask = {"bool": attend[:, None, None],
            "float": torch.zeros(batch, 1, 1, length, dtype=dtype).masked_fill(~attend[:, None, None], -1e4),
            "none": None}[mask_kind]
    expected, _ = sdpa_attention_forward(_Heads(heads // kv_heads), query, key, value, mask, scaling=0.3)
    got, _ = packed_attention(_Heads(heads // kv_heads), query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    off, _ = packed_attention(_Heads(heads // kv_heads), query, key, value, mask, scaling=0.3,
                              options=SpeedupOptions(matmul_decode=False))
    assert torch.equal(off, expected)  # switched off: transformers' SDPA itself


def test_generation_decodes_through_the_matmul_attention(tiny_llama_dir, tiny_tokenizer, monkeypatch):
    import tunelab.attention as attention
    from tunelab.generation import generate_batched, generation_kwargs
    from tunelab.hparams import GenerationArguments

    calls = []
    decode = attention._decode_attention
    monkeypatch.setattr(attention, "_decode_attention", lambda *a: calls.append(a[0].shape) or decode(*a))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("Hello there", "The quick brown fox jumps", "Eat")]
    kwargs = generation_kwargs(GenerationArguments(max_new_tokens=6), tiny_tokenizer)
    answers = generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=3, progress=False)
    assert calls and all(shape[0] == 3 and shape[2] == 1 for shape in calls)  # padded batch, one query row
    eos = [tiny_tokenizer.eos_token_id]
    assert answers == [tiny_tokenizer.decode(greedy_reference(model, p, 6, eos), skip_special_tokens=True).strip()
                       for p in prompts]
    assert model.config._attn_implementation == "sdpa"  # put back after generating
