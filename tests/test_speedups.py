"""Frozen linear weights held in the autocast dtype: same numbers as autocast's per-call casts, originals back."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tunelab.speedups import active_autocast_dtype, linear_weights_cast
from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.trainer import TunelabTrainer

from test_speed import _rows, _train


def test_block_casts_frozen_linears_only_and_puts_originals_back(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2"))  # lm_head tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    model, _ = prepare_model(model, FinetuningArguments(lora_target="c_attn"))
    before = dict(model.named_parameters())
    with linear_weights_cast(model, torch.bfloat16, frozen_only=True) as cast:
        hf = model.get_base_model()
        assert cast == 1 and hf.lm_head.weight.dtype == torch.bfloat16  # gpt2's blocks are Conv1D, not Linear
        assert hf.transformer.wte.weight.dtype == torch.float32  # embeddings stay as autocast leaves them
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert dict(model.named_parameters()) == before  # the very same Parameter objects
    hf = model.get_base_model()
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tie intact
    with linear_weights_cast(model, None) as cast:
        assert cast == 0


def test_block_is_a_no_op_outside_autocast():
    assert active_autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert active_autocast_dtype("cpu") == torch.bfloat16


def test_cast_weights_give_autocasts_logits_and_grads(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model, _ = prepare_model(model, FinetuningArguments(lora_target="all", lora_dropout=0.0))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for cast in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16), linear_weights_cast(model, cast, frozen_only=True):
            logits = model(input_ids=ids).logits
        grads = torch.autograd.grad(logits.float().square().mean(), trainable)
        results.append((logits, grads))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


class _DtypeSpy(TrainerCallback):
    def __init__(self, model):
        self.module = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj")
                           or n.endswith("layers.0.mlp.down_proj.base_layer"))
        self.seen = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append(self.module.weight.dtype)


@pytest.mark.parametrize("method, flags", [
    ("lora", {"lora_target": "q_proj,v_proj", "lora_dropout": 0.0}),
    ("freeze", {"num_layer_trainable": 2}),
    ("p_tuning", {"pre_seq_len": 4}),
])
def test_bf16_training_with_cast_weights_equals_per_call_casts(tiny_llama_dir, tiny_tokenizer, tmp_path,
                                                              method, flags, monkeypatch):
    torch.manual_seed(0)
    model, info = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                FinetuningArguments(finetuning_type=method, **flags))
    per_call = copy.deepcopy(model)
    rows = _rows(len(tiny_tokenizer))
    common = dict(method_info=info, base_model=str(tiny_llama_dir), run_args={}, training={"bf16": True})
    spy = _DtypeSpy(model)
    ours, trainer = _train(TunelabTrainer, model, tiny_tokenizer, rows, tmp_path / "once", callbacks=[spy], **common)
    assert spy.seen == [torch.bfloat16] * 4  # held in bf16 during training
    assert spy.module.weight.dtype == torch.float32  # and back to fp32 after
    monkeypatch.setattr(TunelabTrainer, "_frozen_weight_dtype", lambda self: None)
    theirs, _ = _train(TunelabTrainer, per_call, tiny_tokenizer, rows, tmp_path / "per_call", **common)
    assert ours == theirs
    for (name, a), b in zip(model.named_parameters(), per_call.parameters()):
        assert torch.equal(a, b), name


def test_dropout_keeps_nn_dropouts_distribution_and_gradient():
    from tunelab.speedups import Dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = Dropout(0.1).train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # Bernoulli(0.9): 0.003 is > 4 standard deviations
    p_rounded = round(0.1 * 65536) / 65536  # 0.1000061
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p_rounded)), rtol=0, atol=1e-6)
    assert abs(y.mean().item() - 1) < 0.004  # unbiased: E[y] = x
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx = mask
    assert Dropout(0.1).eval()(x) is x and Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_dropout_keeps_shape_and_dtype_is_seeded_and_falls_back_near_zero_and_one():
    from tunelab.speedups import Dropout

    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first = Dropout(0.3).train()(x)
    torch.manual_seed(1)
    assert first.dtype == torch.bfloat16 and first.shape == x.shape and torch.equal(first, Dropout(0.3).train()(x))
    ones = torch.ones(100_000)
    tiny = Dropout(1e-6).train()(ones)  # rounds to 0 levels: the exact fp32 draw, still a dropout
    assert tiny.dtype == ones.dtype and torch.allclose(tiny[tiny != 0], torch.full_like(tiny[tiny != 0], 1 / (1 - 1e-6)))
    almost_all = Dropout(1 - 1e-6).train()(ones)
    assert torch.isfinite(almost_all).all() and (almost_all != 0).sum() <= 5


def test_random_lanes_are_uniform_in_every_lane_of_a_draw():
    from tunelab.speedups import random_lanes

    torch.manual_seed(0)
    lanes = random_lanes(torch.Size([4 * 100_000 + 3]), torch.device("cpu"))
    assert lanes.dtype == torch.int16 and lanes.numel() == 400_003
    per_lane = lanes[:400_000].view(-1, 4).float()  # the four int16 lanes of each 64-bit draw
    assert (per_lane.mean(0).abs() < 32768 * 0.01).all()  # uniform on [-32768, 32767]: mean ~ -0.5
    assert ((per_lane < 0).float().mean(0) - 0.5).abs().max() < 0.005
    low = (per_lane < -32768 + 6554).float().mean(0)  # the 10% band dropout p=0.1 uses
    assert (low - 0.1).abs().max() < 0.003


def test_cpu_dropout_swaps_loras_dropouts_and_puts_them_back(tiny_llama_dir):
    from tunelab.speedups import Dropout, cpu_dropout

    model, _ = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             FinetuningArguments(lora_target="q_proj,v_proj", lora_dropout=0.1))
    model.train()
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert len(originals) == 8  # 4 layers x q, v
    with cpu_dropout(model, "cuda") as swapped:
        assert swapped == 0  # GPUs keep nn.Dropout's fused kernel
    with cpu_dropout(model, "cpu") as swapped:
        assert swapped == 8 and sum(isinstance(m, Dropout) for m in model.modules()) == 8
        assert all(m.training for m in model.modules() if isinstance(m, Dropout))
        model.eval()  # the Trainer's own eval switches modes inside the block
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == originals
    assert not any(m.training for m in originals) and not any(isinstance(m, Dropout) for m in model.modules())


def test_trainer_trains_with_cpu_dropout_and_restores_nn_dropout(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from tunelab.speedups import Dropout

    model, info = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                FinetuningArguments(lora_target="q_proj,v_proj", lora_dropout=0.5))

    class Spy(TrainerCallback):
        seen: list = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.seen.append(sum(isinstance(m, Dropout) and m.training for m in model.modules()))

    spy = Spy()
    losses, _ = _train(TunelabTrainer, model, tiny_tokenizer, _rows(len(tiny_tokenizer)), tmp_path, callbacks=[spy],
                       method_info=info, base_model=str(tiny_llama_dir), run_args={})
    assert spy.seen == [8] * 4 and all(loss == loss for loss in losses)
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == 8


def test_dropout_masks_option_picks_the_mask_source():
    """SpeedupOptions.dropout_masks reaches cpu_dropout as an argument: "rand" swaps in Dropouts that draw one
    fp32 torch.rand per element (the values nn.Dropout's p gives: kept ones scaled by exactly 1 / (1 - p)),
    "torch" keeps nn.Dropout; an unknown choice is an error naming the valid ones."""
    from tunelab.speedups import Dropout, SpeedupOptions, cpu_dropout

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)).train()
    with cpu_dropout(model, "cpu", "torch") as swapped:
        assert swapped == 0 and type(model[1]) is torch.nn.Dropout
    with cpu_dropout(model, "cpu", SpeedupOptions(dropout_masks="rand").dropout_masks) as swapped:
        assert swapped == 1 and isinstance(model[1], Dropout) and model[1].levels == 0
        torch.manual_seed(0)
        y = model[1](torch.ones(100_000))
    torch.manual_seed(0)
    expected = torch.rand(100_000).ge_(0.1).div_(0.9)  # the exact fp32 draw, p not rounded to 2^-16
    assert torch.equal(y, expected)
    assert Dropout(0.1).levels == round(0.1 * 65536)
    with pytest.raises(ValueError, match="lanes, rand, torch"):
        SpeedupOptions(dropout_masks="bernoulli")
