"""tunelab's speed-ups change no results beyond float noise: padding-free batches and supervised-position
logits give the plain path's losses (HF `model(labels=...)` on padded batches, a plain HF Trainer) on tiny
models; autograd does no backward below the lowest trainable layer; and the bench's FLOP formula matches
what torch's FLOP counter sees. No wall-time assertions here: speed is measured by bench/.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.trainer import (PACKED_ATTENTION, TunelabTrainer, enable_packed_attention, equal_length_runs, pack_batch,
                             supervised_loss)


def padded_batch(vocab: int, lengths=(12, 7, 10), prompt: int = 4):
    """Right-padded batch: prompts masked with -100, padding masked in labels and attention."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "glm"])
@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
@pytest.mark.parametrize("lengths", [(12, 7, 10), (9, 9, 5, 9, 9, 9)], ids=["distinct", "equal-runs"])
def test_packed_loss_and_grads_equal_padded_full_logits(tiny_model_factory, arch, kernel, lengths, monkeypatch):
    if kernel == "sdpa":  # samples longer than the cut-off take SDPA's kernel
        monkeypatch.setattr("tunelab.trainer.MATMUL_ATTENTION_MAX_LEN", 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()  # eval: no dropout
    batch = padded_batch(model.config.vocab_size, lengths)
    plain = model(**batch).loss
    plain_grads = torch.autograd.grad(plain, list(model.parameters()), allow_unused=True)
    assert enable_packed_attention(model) == "sdpa"
    assert model.config._attn_implementation == PACKED_ATTENTION
    packed_inputs = pack_batch(batch)
    assert packed_inputs["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    packed = supervised_loss(model, packed_inputs)
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


def test_matmul_attention_probabilities_are_the_fp32_softmax_rounded_once(monkeypatch):
    """SOFTMAX_DTYPE None (the scores' bf16) gives bit-identical outputs to transformers' fp32 softmax + cast,
    and gradients within bf16 rounding of it; two equal-length samples in one call equal two calls."""
    import tunelab.trainer as trainer

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 2 * 7, 8, generator=g).requires_grad_() for heads in (4, 2, 2))

    def run(dtype, count):
        monkeypatch.setattr(trainer, "SOFTMAX_DTYPE", dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pieces = zip(q.split(7 * count, 2), k.split(7 * count, 2), v.split(7 * count, 2))
            out = torch.cat([trainer._matmul_attention(*p, None, 0.0, count) for p in pieces], dim=2)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out, grads

    out, grads = run(None, 2)
    ref_out, ref_grads = run(torch.float32, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert torch.equal(run(None, 1)[0], out)  # one batched call == one call per sample


def test_equal_length_runs():
    assert equal_length_runs([256, 256, 90, 256]) == [(256, 2), (90, 1), (256, 1)]
    assert equal_length_runs([5, 0, 5, 5, 0]) == [(5, 3)]  # empty samples vanish from the packed row
    assert equal_length_runs([0, 3]) == [(3, 1)]
    assert equal_length_runs([]) == []


def test_pack_batch_only_when_exact_and_useful(monkeypatch):
    batch = padded_batch(50)
    packed = pack_batch(batch)
    assert packed["position_ids"].tolist() == [list(range(12)) + list(range(7)) + list(range(10))]
    assert packed["cu_seq_lens_q"].tolist() == [0, 12, 19, 29]
    assert (packed["labels"][0, [0, 12, 19]] == -100).all()  # no sample predicts the previous sample's token
    full = {k: v[:1] for k, v in batch.items()}  # no padding: packed only for the CPU's matmul attention
    assert pack_batch(full)["cu_seq_lens_q"].tolist() == [0, 12]
    monkeypatch.setattr("tunelab.trainer.MATMUL_ATTENTION_MAX_LEN", 11)
    assert pack_batch(full) is None  # rows longer than that go to SDPA, which is as fast on the dense batch
    assert pack_batch(batch) is not None  # padding is always worth removing
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert pack_batch(left) is None  # left padding: positions would differ
    assert pack_batch({**batch, "token_type_ids": batch["input_ids"]}) is None


def _rows(vocab: int, n: int = 16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 11
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def _train(trainer_cls, model, tokenizer, rows, out, training: dict | None = None, **extra):
    from datasets import Dataset

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, **(training or {}))
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
                          **extra)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer


@pytest.mark.parametrize("method, flags", [
    ("lora", {"lora_target": "q_proj,v_proj", "lora_dropout": 0.0}),
    ("freeze", {"num_layer_trainable": 2}),
    ("full", {}),
])
def test_tunelab_trainer_losses_equal_plain_trainer(tiny_llama_dir, tiny_tokenizer, tmp_path, method, flags):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    model, info = prepare_model(base, FinetuningArguments(finetuning_type=method, **flags))
    plain_model = copy.deepcopy(model)
    rows = _rows(base.config.vocab_size)
    plain, _ = _train(Trainer, plain_model, tiny_tokenizer, rows, tmp_path / "plain")
    ours, trainer = _train(TunelabTrainer, model, tiny_tokenizer, rows, tmp_path / "ours", method_info=info,
                           base_model=str(tiny_llama_dir), run_args={})
    assert len(ours) == len(plain) == 4
    assert ours == pytest.approx(plain, rel=1e-4, abs=1e-5), (ours, plain)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert hf.config._attn_implementation == "sdpa"  # packing is switched off again after training
    for (name, a), b in zip(model.named_parameters(), plain_model.parameters()):
        if a.requires_grad:
            assert torch.allclose(a, b, atol=1e-5), name


def _matmul_uses(model, batch, vocab):
    from bench.common import record_matmuls

    uses, handles = record_matmuls(model, vocab)
    loss = supervised_loss(model, batch)
    for h in handles:
        h.remove()
    return uses, loss


def test_no_backward_below_the_lowest_trainable_layer(tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model, _ = prepare_model(base, FinetuningArguments(lora_target="qkv", target_layers="last:1"))
    model.train()
    uses, _ = _matmul_uses(model, padded_batch(base.config.vocab_size), base.config.vocab_size)
    below = [n for n, u in uses.items() if ".layers.3." not in n and not u.is_head]
    assert below and not any(uses[n].input_grad or uses[n].weight_grad for n in below)
    # inside the last layer the frozen q/k/v read the layer's (frozen) input: no input grad either
    assert not any(u.input_grad for n, u in uses.items() if "base_layer" in n and "self_attn" in n
                   and not n.endswith("o_proj.base_layer"))
    assert uses["base_model.model.lm_head"].input_grad and not uses["base_model.model.lm_head"].weight_grad


@pytest.mark.parametrize("method, flags", [("lora", {"lora_target": "q_proj,v_proj"}), ("freeze", {}),
                                           ("full", {})])
def test_bench_flop_formula_matches_torch_flop_counter(tiny_llama_dir, method, flags):
    """bench.common's per-step FLOPs = the matmul FLOPs torch counts for forward + backward (attention apart)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import step_flops

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.config.attention_dropout = 0.0
    model, _ = prepare_model(base, FinetuningArguments(finetuning_type=method, num_layer_trainable=2, **flags))
    batch = padded_batch(base.config.vocab_size, lengths=(12, 12, 12))  # no padding: rows = real tokens
    uses, _ = _matmul_uses(model, batch, base.config.vocab_size)
    with FlopCounterMode(display=False) as counter:
        supervised_loss(model, batch).backward()
    # nn.Linear lowers to mm/addmm; rotary embeddings' bmm and the SDPA kernel are not matmul parameters
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if op.__name__.split(".")[0] in ("mm", "addmm"))
    keep = int((batch["labels"][:, 1:] != -100).sum())
    assert step_flops(list(uses.values()), batch["input_ids"].numel(), keep) == counted


def test_generation_casts_weights_once_with_the_same_answers(tiny_llama_dir, tiny_tokenizer):
    """Under bf16 autocast, bf16 weight copies held for the whole call give exactly autocast's answers."""
    from tunelab.generation import generate_batched

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    params = {name: p for name, p in model.named_parameters()}
    prompts = [tiny_tokenizer.encode(t) for t in ("Hello, how are", "你好", "The quick brown fox jumps")]
    kwargs = {"do_sample": False, "max_new_tokens": 12}
    answers = {once: generate_batched(model, tiny_tokenizer, prompts, kwargs, batch_size=2, progress=False,
                                      autocast_dtype=torch.bfloat16, cast_weights_once=once)
               for once in (False, True)}
    assert answers[True] == answers[False]
    assert all(p is params[name] for name, p in model.named_parameters())  # originals back, fp32
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
