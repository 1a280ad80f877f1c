"""The 2023 toolkit's flags (finetune.py's ModelArguments, DataTrainingArguments, FinetuningArguments at
45c7ead): each one is a tunelab option, implemented or refused in one line naming what to use instead;
--quantization_bit (QLoRA through bitsandbytes) and --resume_lora_training as in 2023."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_argv

from tunelab.hparams import REFUSED_2023, TunelabError, option_names, parse_args
from tunelab.train import run

# ../shared/reference/README.md: the three 2023 option dataclasses, every field
FLAGS_2023 = {
    "model": ["model_name_or_path", "config_name", "tokenizer_name", "cache_dir", "use_fast_tokenizer",
              "model_revision", "use_auth_token", "quantization_bit", "checkpoint_dir"],
    "data": ["dataset", "dataset_dir", "split", "overwrite_cache", "preprocessing_num_workers", "max_source_length",
             "max_target_length", "max_samples", "num_beams", "ignore_pad_token_for_loss", "source_prefix"],
    "finetuning": ["finetuning_type", "num_layer_trainable", "name_module_trainable", "pre_seq_len",
                   "prefix_projection", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
                   "resume_lora_training", "plot_loss"],
}
GPU = torch.cuda.is_available()


def _parse(*flags: str):
    return parse_args(["--do_train", "--output_dir", "unused", *flags])


@pytest.mark.parametrize("name", [n for names in FLAGS_2023.values() for n in names])
def test_every_2023_flag_is_an_option(name):
    assert name in option_names()


@pytest.mark.parametrize("name, value", [
    ("config_name", "cfg"), ("tokenizer_name", "tok"), ("cache_dir", "c"), ("model_revision", "v0.1"),
    ("use_auth_token", "true"), ("use_fast_tokenizer", "false"), ("split", "validation"),
    ("ignore_pad_token_for_loss", "false")])
def test_refused_2023_flags_say_what_to_use_instead(name, value):
    assert name in REFUSED_2023
    with pytest.raises(TunelabError, match=rf"^--{name} \S+ is not supported: \S.+") as err:
        _parse(f"--{name}", value)
    assert "\n" not in str(err.value)


def test_refused_2023_flags_pass_at_their_2023_default():
    args = _parse("--use_fast_tokenizer", "true", "--use_auth_token", "false", "--split", "train",
                  "--ignore_pad_token_for_loss", "true")
    assert args.model.use_fast_tokenizer and args.data.split == "train"


@pytest.mark.parametrize("flags, message", [
    (["--quantization_bit", "3"], "--quantization_bit 3 is not supported: .*4"),
    (["--quantization_bit", "4", "--finetuning_type", "freeze"], "use --finetuning_type lora"),
    (["--quantization_bit", "8", "--finetuning_type", "p_tuning"], "QLoRA"),
])
def test_quantization_bad_input(flags, message):
    with pytest.raises(TunelabError, match=message):
        _parse(*flags)


@pytest.mark.skipif(GPU, reason="the refusal is for machines without a CUDA GPU")
def test_quantization_without_a_gpu_is_refused_before_anything_loads(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch):
    from tunelab import setup

    monkeypatch.setattr(setup, "load_base", lambda *a: pytest.fail("the model must not load"))
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match=r"--quantization_bit 4 needs a CUDA GPU"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--quantization_bit", "4")))
    assert not out.exists()


@pytest.mark.skipif(not GPU, reason="bitsandbytes' 4-bit kernels need a CUDA GPU (none here)")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_fp32_adapters_on_a_quantized_base(tiny_model_factory, tiny_data_dir, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_model_factory("llama"), tiny_data_dir, out, "lora", "--quantization_bit",
                              str(bits), "--max_steps", "4")))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)


# ---- --resume_lora_training ----

def _lora_run(model_dir, data_dir, out, *extra):
    run(parse_args(train_argv(model_dir, data_dir, out, "lora", "--max_steps", "2", *extra)))
    return out


def test_resume_lora_training_true_goes_on_training_the_last_adapter(tiny_llama_dir, tiny_data_dir, tmp_path):
    first = _lora_run(tiny_llama_dir, tiny_data_dir, tmp_path / "a", "--lora_rank", "4")
    # learning rate 0: what is saved is exactly the adapter training started from
    second = _lora_run(tiny_llama_dir, tiny_data_dir, tmp_path / "b", "--checkpoint_dir", str(first),
                       "--learning_rate", "0", "--lora_rank", "8")
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (first, second))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checkpoint's rank-4 adapter, not a new one
    trainable = json.loads((second / "trainable.json").read_text())
    modules = json.loads((first / "trainable.json").read_text())["modules"]
    assert trainable["lora_rank"] == 4 and trainable["modules"] == modules


def test_resume_lora_training_false_stacks_a_new_adapter(tiny_llama_dir, tiny_data_dir, tmp_path):
    first = _lora_run(tiny_llama_dir, tiny_data_dir, tmp_path / "a", "--lora_rank", "4")
    second = _lora_run(tiny_llama_dir, tiny_data_dir, tmp_path / "b", "--checkpoint_dir", str(first),
                       "--learning_rate", "0", "--resume_lora_training", "false", "--lora_rank", "8")
    after = load_file(str(second / "adapter_model.safetensors"))
    lora_b = [w for n, w in after.items() if "lora_B" in n]
    assert lora_b and all(w.shape[1] == 8 and not w.any() for w in lora_b)  # a fresh rank-8 adapter (B = 0)


# ---- HF TrainingArguments fields keep their HF types ----

@pytest.mark.parametrize("value, expect", [("non_padding", "non_padding"), ("all", "all"), ("true", "all"),
                                           ("no", "no")])
def test_str_or_bool_training_fields_take_their_words(value, expect):
    assert _parse("--include_num_input_tokens_seen", value).training.include_num_input_tokens_seen == expect


def test_str_or_bool_training_field_from_a_config_dict():
    args = parse_args(config={"do_train": True, "output_dir": "x", "include_num_input_tokens_seen": "non_padding"})
    assert args.training.include_num_input_tokens_seen == "non_padding"


# ---- infer.py / web_demo.py parsed ModelArguments only: tunelab chat / webui take the same options ----

@pytest.mark.parametrize("name, value", [("config_name", "cfg"), ("tokenizer_name", "tok"), ("cache_dir", "c"),
                                         ("model_revision", "v0.1"), ("use_auth_token", "true"),
                                         ("use_fast_tokenizer", "false")])
def test_infer_and_web_demo_refuse_the_same_model_flags(name, value):
    from tunelab.hparams import parse_with
    from tunelab.webui import WebUIArguments

    for parse in (lambda argv: parse_args(argv, prog="tunelab chat"),
                  lambda argv: parse_with(argv, WebUIArguments, prog="tunelab webui")[0]):
        with pytest.raises(TunelabError, match=rf"^--{name} \S+ is not supported: \S.+"):
            parse([f"--{name}", value])


def test_infer_and_web_demo_take_the_2023_model_flags_they_implement():
    from tunelab.hparams import parse_with
    from tunelab.webui import WebUIArguments

    argv = ["--model_name_or_path", "m", "--checkpoint_dir", "a,b", "--quantization_bit", "8",
            "--use_fast_tokenizer", "true", "--use_auth_token", "false"]
    for args in (parse_args(argv, prog="tunelab chat"), parse_with(argv, WebUIArguments, prog="tunelab webui")[0]):
        model = args.model
        assert (model.model_name_or_path, model.checkpoint_dir, model.quantization_bit) == ("m", "a,b", 8)


@pytest.mark.parametrize("bits, installed, refused", [(8, (0, 45, 0), True), (8, (0, 48, 0), False),
                                                      (4, (0, 45, 0), False)])
def test_8_bit_needs_a_bitsandbytes_that_moves_8_bit_models(monkeypatch, bits, installed, refused):
    # as on a CUDA machine with bitsandbytes `installed`: eval and chat move the loaded model with .to(device)
    import importlib.util

    from tunelab import quantization

    model = _parse("--quantization_bit", str(bits)).model  # parsed first: HF's TrainingArguments would set up CUDA
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: name == "bitsandbytes" or real_find_spec(name, *a))
    monkeypatch.setattr(quantization, "_version", lambda package: installed)
    if refused:
        with pytest.raises(TunelabError, match=r"--quantization_bit 8 needs bitsandbytes >= 0.48 .*bit 4"):
            quantization.check_quantization(model)
    else:
        quantization.check_quantization(model)


# ---- the README's "Coming from LLaMA-Factory" mapping names real options ----

def test_llama_factory_mapping_names_only_tunelab_options():
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Coming from LLaMA-Factory", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    named = {code.split(":")[0].strip() for row in rows for code in re.findall(r"`([^`]+)`", row[2])
             if not code.startswith("tunelab ")}
    assert len(rows) >= 10 and {"checkpoint_dir", "attn_implementation", "torch_dtype", "eval_likelihood"} <= named
    assert named <= set(option_names()), named - set(option_names())
