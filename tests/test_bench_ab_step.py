"""bench.ab_step: each switch reaches tunelab as SpeedupOptions for its step and is undone when the step
ends, and the paired ratios are what is printed."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from tunelab.attention import DEFAULT_OPTIONS, PACKED_ATTENTION, enable_packed_attention, pack_batch, packed_attention
from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.speedups import Dropout, linear_weights_cast
from tunelab.trainer import supervised_loss


@pytest.mark.parametrize("name", ["default", "sliced_attention", "per_sample_attention", "fp32_softmax",
                                  "unfused_ce", "rand_dropout", "nn_dropout",
                                  "dense_sdpa", "no_packing", "full_logits", "per_call_casts"])
def test_each_switch_acts_inside_its_block_and_is_undone_after(tiny_llama_dir, name):
    from bench.ab_step import SWITCHES, variant_contexts

    assert name == "default" or name in SWITCHES
    model, _ = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             FinetuningArguments(finetuning_type="lora", lora_target="q_proj,v_proj"))
    model.train()
    enable_packed_attention(model)
    hf = model.get_base_model()
    default_entry = AttentionInterface()[PACKED_ATTENTION]
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with linear_weights_cast(model, torch.bfloat16, frozen_only=True):
        weights = {n: p for n, p in model.named_parameters()}
        with variant_contexts(model)[name]() as (options, packing):
            assert (options == DEFAULT_OPTIONS) == (name == "default")
            packed = pack_batch(batch, options) if packing else None
            assert (packed is None) == (name in ("dense_sdpa", "no_packing"))
            assert any(isinstance(m, Dropout) for m in model.modules()) == (name != "nn_dropout")
            frozen = hf.model.layers[0].self_attn.k_proj.weight
            assert frozen.dtype == (torch.float32 if name == "per_call_casts" else torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = supervised_loss(model, packed or batch, options)
            loss.backward()
            assert torch.isfinite(loss)
        assert all(p is weights[n] for n, p in model.named_parameters())
    assert hf.config._attn_implementation == PACKED_ATTENTION
    assert AttentionInterface()[PACKED_ATTENTION] is default_entry
    assert not any(isinstance(m, Dropout) for m in model.modules())


def test_summary_is_the_median_of_paired_ratios():
    from bench.ab_step import summarize

    result = {"names": ["default", "unfused_ce"], "times": {"default": [1.0, 2.0, 1.0], "unfused_ce": [1.1, 2.4, 1.0]}}
    lines = {line["variant"]: line for line in summarize(result)}
    assert lines["default"]["speedup_of_default"] == 1.0
    assert lines["unfused_ce"]["speedup_of_default"] == pytest.approx(1.1)  # median of 1.1, 1.2, 1.0
    assert (lines["unfused_ce"]["min_ratio"], lines["unfused_ce"]["max_ratio"]) == pytest.approx((1.0, 1.2))


def test_sliced_variant_passes_unpacked_batches_to_tunelab_attention():
    """The bench's previous-version attention leaves unpacked batches (no sample bounds) to tunelab's own path."""
    from bench.train import sliced_packed_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 5, 8, generator=g) for heads in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    ours, _ = packed_attention(module, q, k, v, None)
    sliced, _ = sliced_packed_attention(packed_attention, module, q, k, v, None, options=DEFAULT_OPTIONS)
    assert torch.equal(sliced, ours)
