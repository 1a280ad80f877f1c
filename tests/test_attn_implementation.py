"""--attn_implementation: the attention kernel the base loads with, and whether training packs batches
padding-free (auto/sdpa: tunelab's per-sample attention, the CPU default; eager: padded batches;
flash_attention_2: its varlen kernel, CUDA only)."""

from __future__ import annotations

import pytest
import torch
from test_train import train_argv

from tunelab import setup
from tunelab.attention import flash_varlen
from tunelab.hparams import TunelabError, parse_args
from tunelab.trainer import TunelabTrainer
from tunelab.train import run


@pytest.mark.parametrize("choice, loaded, packed", [("auto", "sdpa", True), ("sdpa", "sdpa", True),
                                                    ("eager", "eager", False)])
def test_the_kernel_loaded_and_whether_training_packs(monkeypatch, tiny_llama_dir, tiny_data_dir, tmp_path,
                                                      choice, loaded, packed):
    seen = {}
    real_load, real_loss = setup.load_base, TunelabTrainer.compute_loss

    def load(model_args, checkpoints):
        model, tokenizer, path = real_load(model_args, checkpoints)
        seen["loaded"] = model.config._attn_implementation
        return model, tokenizer, path

    def loss(self, *args, **kwargs):
        seen.setdefault("packing", self.packing)
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(setup, "load_base", load)
    monkeypatch.setattr(TunelabTrainer, "compute_loss", loss)
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, tmp_path / "run", "lora", "--attn_implementation",
                              choice, "--max_steps", "1")))
    assert seen == {"loaded": loaded, "packing": packed}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_flash_attention_without_a_gpu_is_refused_before_loading(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package: use auto"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--attn_implementation",
                                  "flash_attention_2")))
    assert not out.exists()


def test_flash_attention_models_take_packed_rows_as_they_are(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not flash_varlen(model)
    model.config._attn_implementation = "flash_attention_2"  # what loading with it records (no kernel needed here)
    assert flash_varlen(model)


@pytest.mark.parametrize("torch_dtype, refused", [("auto", True), ("float32", True), ("bfloat16", False),
                                                  ("float16", False)])
def test_flash_attention_needs_a_16_bit_base(monkeypatch, tiny_llama_dir, torch_dtype, refused):
    # as on a CUDA machine with flash-attn installed (the tiny checkpoint is float32, so auto means float32)
    import importlib.util

    model = parse_args(["--model_name_or_path", str(tiny_llama_dir), "--attn_implementation", "flash_attention_2",
                        "--torch_dtype", torch_dtype]).model  # parsed first: HF's TrainingArguments would set up CUDA
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "flash_attn" or real_find_spec(name, *a))
    if refused:
        with pytest.raises(TunelabError, match="flash_attention_2 computes in 16 bits only: .*--torch_dtype bfloat16"):
            setup.check_model_options(model)
    else:
        setup.check_model_options(model)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none here); bench/gpu_check.sh runs it where there is one")
@pytest.mark.parametrize("kernel", ["sdpa", "flash_attention_2"])
def test_packed_rows_on_a_gpu_give_the_padded_batch_loss(tiny_llama_dir, kernel):
    import importlib.util

    from test_attention import padded_batch
    from transformers import AutoModelForCausalLM

    from tunelab.attention import pack_batch, packed_attention_enabled
    from tunelab.trainer import supervised_loss

    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16,
                                                 attn_implementation=kernel).cuda().eval()
    batch = {k: v.cuda() for k, v in padded_batch(model.config.vocab_size).items()}
    padded = supervised_loss(model, batch)  # right-padded rows with their attention mask
    with packed_attention_enabled(model) as packing:
        assert packing == (kernel == "sdpa") and flash_varlen(model) == (kernel == "flash_attention_2")
        packed = supervised_loss(model, pack_batch(batch))  # one padding-free row: tunelab's SDPA or flash varlen
    assert torch.allclose(packed.float(), padded.float(), rtol=1e-2, atol=1e-2), (packed, padded)  # bf16 rounding
