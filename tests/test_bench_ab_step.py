"""bench.ab_step: every switch is undone when its step ends, and the paired ratios are what is printed."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import tunelab.speedups as speedups
import tunelab.trainer as trainer
from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model


@pytest.mark.parametrize("name", ["default", "sliced_attention", "per_sample_attention", "fp32_softmax",
                                  "unfused_ce", "rand_dropout", "nn_dropout",
                                  "dense_sdpa", "no_packing", "full_logits", "per_call_casts"])
def test_each_switch_acts_inside_its_block_and_is_undone_after(tiny_llama_dir, name):
    from bench.ab_step import SWITCHES, variant_contexts

    assert name == "default" or name in SWITCHES
    model, _ = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             FinetuningArguments(finetuning_type="lora", lora_target="q_proj,v_proj"))
    trainer.enable_packed_attention(model)
    before = (trainer.packed_attention, trainer.cross_entropy, trainer.pack_batch, trainer.equal_length_runs,
              trainer.SOFTMAX_DTYPE, speedups.LANE_LEVELS, AttentionInterface()[trainer.PACKED_ATTENTION])
    weights = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with speedups.linear_weights_cast(model, torch.bfloat16, frozen_only=True):
        with variant_contexts(model)[name]():
            packed = trainer.pack_batch(batch)
            assert (packed is None) == (name in ("dense_sdpa", "no_packing"))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = trainer.supervised_loss(model, packed or batch)
            loss.backward()
            assert torch.isfinite(loss)
    assert (trainer.packed_attention, trainer.cross_entropy, trainer.pack_batch, trainer.equal_length_runs,
            trainer.SOFTMAX_DTYPE, speedups.LANE_LEVELS, AttentionInterface()[trainer.PACKED_ATTENTION]) == before
    assert all(p is weights[n] for n, p in model.named_parameters())


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
    ours, _ = trainer.packed_attention(module, q, k, v, None)
    sliced, _ = sliced_packed_attention(trainer.packed_attention, module, q, k, v, None)
    assert torch.equal(sliced, ours)
