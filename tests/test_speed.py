"""tunelab's speed-ups change no results beyond float noise: the trainer's padding-free batches and
supervised-position logits give a plain HF Trainer's losses on tiny models (the packed attention itself:
tests/test_attention.py); autograd does no backward below the lowest trainable layer; and the bench's FLOP
formula matches what torch's FLOP counter sees. No wall-time assertions here: speed is measured by bench/.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.trainer import TunelabTrainer, supervised_loss

from test_attention import padded_batch


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

    args = TrainingArguments(**{"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 4,
                                "learning_rate": 5e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [],
                                "seed": 0, "use_cpu": True, "remove_unused_columns": False, "disable_tqdm": True,
                                **(training or {})})
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
