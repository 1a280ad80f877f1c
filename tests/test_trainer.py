"""The shared training loop's pieces: the supervised-position loss equals the plain full-logits loss, and
the trainer takes its speed-up switches as an argument (SpeedupOptions)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.speedups import SpeedupOptions
from tunelab.trainer import TunelabTrainer, supervised_loss


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100          # prompt masked
    labels[2, 9:] = -100          # right padding of the last row
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "glm"])
def test_supervised_loss_equals_full_logits_loss(tiny_model_factory, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        ours = supervised_loss(model, batch)
        plain = model(**batch).loss  # HF's own shifted CE over all positions
    assert torch.allclose(ours, plain, atol=1e-5), (ours, plain)


def test_supervised_loss_empty_batch_is_zero(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = -100
    loss = supervised_loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("options", [SpeedupOptions(supervised_logits=False),
                                     SpeedupOptions(chunked_cross_entropy=False)], ids=["full_logits", "unfused_ce"])
def test_loss_options_compute_the_same_value_another_way(tiny_llama_dir, options):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(supervised_loss(model, batch, options), supervised_loss(model, batch), atol=1e-5)


def test_trainer_speedups_argument_switches_packing_and_casts(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """SpeedupOptions passed to the trainer reach its steps: packing off keeps padded batches on SDPA and
    the loss of the default (packed) run; cast_frozen_weights off keeps fp32 frozen weights under bf16."""
    from transformers import TrainerCallback

    from test_speed import _rows, _train

    class Spy(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            hf = model.get_base_model()
            frozen = hf.model.layers[0].mlp.down_proj.base_layer.weight
            self.seen.append((hf.config._attn_implementation, frozen.dtype))

    runs = {}
    off = SpeedupOptions(packing=False, cast_frozen_weights=False)
    for name, options in {"default": SpeedupOptions(), "off": off}.items():
        torch.manual_seed(0)
        model, info = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                    FinetuningArguments(lora_target="q_proj,v_proj,down_proj", lora_dropout=0.0))
        spy = Spy()
        losses, trainer = _train(TunelabTrainer, model, tiny_tokenizer, _rows(len(tiny_tokenizer)), tmp_path / name,
                                 training={"bf16": True}, callbacks=[spy], method_info=info,
                                 base_model=str(tiny_llama_dir), run_args={}, speedups=options)
        assert trainer.speedups is options and not trainer.packing
        runs[name] = losses, spy.seen
    assert set(runs["default"][1]) == {("tunelab_packed", torch.bfloat16)}
    assert set(runs["off"][1]) == {("sdpa", torch.float32)}
    assert runs["off"][0] == pytest.approx(runs["default"][0], abs=2e-2)  # bf16 noise
