"""Base precision (--torch_dtype, tunelab/setup.py): the frozen base loads in the asked dtype, trained weights
stay float32 master weights, a 16-bit base trains under its own autocast, float16 needs a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_argv

from tunelab import setup
from tunelab.hparams import TunelabError, parse_args
from tunelab.methods import method_names
from tunelab.train import run


def _args(*flags: str):
    return parse_args(["--do_train", "--output_dir", "unused", *flags])


def _cpu(monkeypatch, fast_bf16: bool = False) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: fast_bf16)


@pytest.mark.parametrize("flag, expect", [("auto", torch.float32), ("float32", torch.float32),
                                          ("bfloat16", torch.bfloat16)])
def test_base_dtype_on_a_cpu(monkeypatch, flag, expect):
    _cpu(monkeypatch, fast_bf16=True)  # auto is float32 even where the CPU does bf16 fast
    assert setup.base_dtype(_args("--torch_dtype", flag).model) == expect


def test_auto_on_a_gpu_is_the_checkpoints_dtype(monkeypatch, tmp_path):
    args = parse_args(["--model_name_or_path", str(tmp_path), "--do_eval", "--output_dir", "x"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for written, expect in (({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "float16"}, torch.float16),
                            ({}, torch.float32), ({"dtype": "int8"}, torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps(written))
        assert setup.base_dtype(args.model) == expect, written


def test_float16_on_a_cpu_is_refused_with_the_reason(monkeypatch, tiny_llama_dir, tiny_data_dir, tmp_path):
    _cpu(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match=r"--torch_dtype float16 needs a GPU.*bfloat16"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--torch_dtype", "float16")))
    assert not out.exists()


def test_a_bf16_base_trains_under_bf16_autocast(monkeypatch):
    half, full = _args("--torch_dtype", "bfloat16", "--bf16", "false"), _args("--torch_dtype", "float32")
    _cpu(monkeypatch, fast_bf16=False)
    training = setup.resolve_precision(half)
    assert (training.bf16, training.fp16, training.use_cpu) == (True, False, True)
    assert not setup.resolve_precision(full).bf16  # slow-bf16 CPU: fp32


def test_upcast_trainable_casts_only_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert setup.upcast_trainable(model) == 2  # weight and bias of the second layer
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_base_dtype_key_leaves_float32_keys_unchanged(monkeypatch):
    _cpu(monkeypatch)
    assert setup.base_dtype_key(_args().model) == []
    assert setup.base_dtype_key(_args("--torch_dtype", "bfloat16").model) == ["bfloat16"]


@pytest.mark.parametrize("method", method_names(lambda m: m.trains))
def test_every_method_trains_on_a_bf16_base(monkeypatch, tiny_llama_dir, tiny_data_dir, tmp_path, method):
    """bf16 frozen base + fp32 trained weights: no dtype clash in any method, finite falling loss."""
    seen = {}
    real = setup.load_base

    def spy(model_args, checkpoints):
        model, tokenizer, path = real(model_args, checkpoints)
        seen["dtype"] = {p.dtype for p in model.parameters()}
        return model, tokenizer, path

    monkeypatch.setattr(setup, "load_base", spy)
    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, method, "--torch_dtype", "bfloat16",
                              "--bf16", "true", "--max_steps", "6")))
    assert seen["dtype"] == {torch.bfloat16}
    state = json.loads((out / "trainer_state.json").read_text())
    curve = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert all(l == l for l in curve) and curve[-1] < curve[0], curve


def test_lora_adapters_on_a_bf16_base_are_fp32_and_change(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--torch_dtype", "bfloat16",
                              "--max_steps", "4")))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    # LoRA B starts at zero: a non-zero B means the optimizer's updates landed in the fp32 master weights
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)
