"""P-Tuning v2 prefix (tunelab/prefix.py) on the tiny models: parameter counts, what trains, initial loss,
loss falling, generate() == repeated full forward passes with the prefix (batch 1 and a left-padded
batch of 2, four architectures), and the save/load round trip. One slow test on the real SmolLM2.

    pytest tests/test_prefix.py -m "not slow"
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tunelab.hparams import TunelabError
from tunelab.prefix import PREFIX_CONFIG, PREFIX_WEIGHTS, PrefixModel, load_prefix, num_prefix_params

ARCHS = ("llama", "qwen2", "gpt2", "glm")
PROMPTS = ["Hello, how are you today?", "The quick"]


def _base(factory, arch="llama", num_layers=4):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(factory(arch, num_layers))
    return model.eval()


def _batch(tokenizer, texts):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _scramble(model: PrefixModel, seed: int = 0) -> None:
    """Move the prefix far from its init, so a test can tell whether generation really uses it."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.encoder.anchor.normal_(std=3.0)


def _train_batch(tokenizer):
    ids, mask = _batch(tokenizer, ["Give three tips for staying healthy.", "你好，今天天气怎么样？"])
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# ---- counts and what trains ----

@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_params_equal_the_analytic_count(tiny_model_factory, arch, projection):
    model = PrefixModel(_base(tiny_model_factory, arch), pre_seq_len=5, projection=projection)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("encoder.") for n in trainable)  # the base model is frozen
    assert sum(p.numel() for p in trainable.values()) == num_prefix_params(model.config, 5, projection)


def test_analytic_counts_of_known_models():
    # 2023 ChatGLM-6B: 28 layers, hidden 4096, 32 heads, no grouped kv -> 16 x 28 x 2 x 4096.
    chatglm = SimpleNamespace(num_layers=28, hidden_size=4096, num_attention_heads=32, model_type="chatglm")
    assert num_prefix_params(chatglm, 16, projection=False) == 3_670_016
    # SmolLM2-135M: 30 layers, 3 kv heads x 64 -> kv_dim 192.
    smol = SimpleNamespace(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, model_type="llama")
    assert num_prefix_params(smol, 16, projection=False) == 16 * 30 * 2 * 192
    out = 30 * 2 * 192
    assert num_prefix_params(smol, 16, projection=True) == 16 * 576 + 576 * 576 + 576 + 576 * out + out


def test_bad_pre_seq_len_and_double_wrap(tiny_model_factory):
    base = _base(tiny_model_factory)
    with pytest.raises(TunelabError, match="pre_seq_len"):
        PrefixModel(base, pre_seq_len=0)
    with pytest.raises(TunelabError, match="already"):
        PrefixModel(PrefixModel(base, 2))


def test_gradient_checkpointing_is_refused(tiny_model_factory):
    model = PrefixModel(_base(tiny_model_factory), 2)
    with pytest.raises(TunelabError, match="gradient_checkpointing"):
        model.gradient_checkpointing_enable()


# ---- loss ----

@pytest.mark.parametrize("arch", ARCHS)
def test_initial_loss_is_near_the_base_loss(tiny_model_factory, tiny_tokenizer, arch):
    base = _base(tiny_model_factory, arch)
    ids, mask, labels = _train_batch(tiny_tokenizer)
    with torch.no_grad():
        base_loss = base(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        for projection in (False, True):
            model = PrefixModel(base, 8, projection=projection)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
            assert abs(loss - base_loss) < 0.05, (arch, projection, loss, base_loss)


@pytest.mark.parametrize("projection", [False, True])
def test_loss_falls_and_only_the_prefix_changes(tiny_model_factory, tiny_tokenizer, projection):
    torch.manual_seed(0)
    model = PrefixModel(_base(tiny_model_factory), 8, projection=projection).train()
    frozen = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    ids, mask, labels = _train_batch(tiny_tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # A random tiny model barely listens to any context, so the drop is small but steady (5.77 -> 5.70/5.58).
    assert losses[-1] < losses[0] - 0.05 and losses[-1] == min(losses), losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.base.named_parameters())


def test_forward_passes_logits_to_keep_through(tiny_model_factory, tiny_tokenizer):
    """The trainer's loss asks for logits at supervised positions only (a boolean mask over real tokens)."""
    model = PrefixModel(_base(tiny_model_factory), 4)
    ids, mask, labels = _train_batch(tiny_tokenizer)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -3:] = True
    with torch.no_grad():
        part = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
        full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(part, full[keep])


# ---- generation ----

def _greedy_by_forward(model: PrefixModel, ids, mask, steps: int):
    """Greedy decoding with a full forward pass (fresh prefix cache) per token: the reference."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_equals_repeated_forward_and_uses_the_prefix(tiny_model_factory, tiny_tokenizer, arch, batch):
    base = _base(tiny_model_factory, arch)
    model = PrefixModel(base, 6)
    _scramble(model)
    ids, mask = _batch(tiny_tokenizer, PROMPTS[:batch])
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=tiny_tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # HF convention: prompt + new tokens
    assert torch.equal(out, _greedy_by_forward(model, ids, mask, 6))
    assert not torch.equal(out, base.generate(input_ids=ids, attention_mask=mask, **kw))


def test_left_padding_does_not_change_a_row(tiny_model_factory, tiny_tokenizer):
    model = PrefixModel(_base(tiny_model_factory, "gpt2"), 4)  # absolute positions: the strict case
    _scramble(model)
    ids, mask = _batch(tiny_tokenizer, PROMPTS)
    alone, alone_mask = _batch(tiny_tokenizer, PROMPTS[1:])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1, -1]
        single = model(input_ids=alone, attention_mask=alone_mask).logits[0, -1]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)


def test_sampling_and_beam_search_run(tiny_model_factory, tiny_tokenizer):
    model = PrefixModel(_base(tiny_model_factory, "qwen2"), 4)
    ids, mask = _batch(tiny_tokenizer, PROMPTS)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.7, temperature=0.95,
                             max_new_tokens=5, min_new_tokens=5)
    beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=2,
                           max_new_tokens=5, min_new_tokens=5)
    assert sampled.shape == (2, ids.shape[1] + 5)
    assert beams.shape == (4, ids.shape[1] + 5)
    assert torch.equal(beams[::2, : ids.shape[1]], ids)
    model.base.generation_config.num_beams = 2  # an explicit argument still wins over the model's default
    assert model.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=2).shape[0] == 2


# ---- saving ----

@pytest.mark.parametrize("projection", [False, True])
def test_save_load_round_trip_gives_identical_logits(tiny_model_factory, tiny_tokenizer, tmp_path, projection):
    model = PrefixModel(_base(tiny_model_factory), 4, projection=projection)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    model.save_prefix(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {PREFIX_WEIGHTS, PREFIX_CONFIG}
    loaded = load_prefix(_base(tiny_model_factory), tmp_path)
    ids, mask = _batch(tiny_tokenizer, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert (loaded.pre_seq_len, loaded.projection) == (4, projection)


def test_load_refuses_a_prefix_for_another_model(tiny_model_factory, tmp_path):
    PrefixModel(_base(tiny_model_factory, "llama", 4), 4).save_prefix(tmp_path)
    with pytest.raises(TunelabError, match="layers"):
        load_prefix(_base(tiny_model_factory, "llama", 2), tmp_path)
    with pytest.raises(TunelabError, match="no P-Tuning v2 prefix"):
        load_prefix(_base(tiny_model_factory), tmp_path / "missing")


# ---- the real default model ----

CHAT_SAMPLES = [
    ("Give three tips for staying healthy.",
     "1. Eat a balanced diet with plenty of fruits and vegetables.\n2. Exercise regularly.\n3. Get enough sleep."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Write a haiku about autumn.", "Crimson leaves falling,\nwhispers of the cooling wind,\nthe year exhales slow."),
    ("Explain what a prime number is.",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7."),
]


def _chat_batch(tok):
    """Right-padded chat samples with labels on the responses only (as training sees them)."""
    rows = []
    for question, answer in CHAT_SAMPLES:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        a_ids = tok(answer + tok.eos_token, add_special_tokens=False).input_ids
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    return ids, mask, labels


@pytest.mark.slow
def test_smollm2_prefix_starts_near_base_and_generates():
    """Measured: base 1.836, prefix at init 1.939 (peft's N(0, 1) init: 7.08)."""
    from tunelab.hparams import ModelArguments
    from tunelab.model import load_model_and_tokenizer

    base, tok, _ = load_model_and_tokenizer(ModelArguments())
    base.eval()
    ids, mask, labels = _chat_batch(tok)
    model = PrefixModel(base, 16)
    with torch.no_grad():
        base_loss = base(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(loss - base_loss) < 0.25, (loss, base_loss)
    tok.padding_side = "left"
    prompt = tok.apply_chat_template([[{"role": "user", "content": "What is 2+2?"}],
                                      [{"role": "user", "content": "Name a colour."}]],
                                     add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    assert out.shape[1] > prompt["input_ids"].shape[1]
