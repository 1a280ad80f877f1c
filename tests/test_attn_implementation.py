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
