"""The one setup path (tunelab/setup.py): precision, inherited options, base + checkpoints. Every function
returns new values and leaves the Args it was given as they were."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from chat_helpers import make_lora

from tunelab import setup
from tunelab.hparams import parse_args
from tunelab.paths import cache_key

PREFIX = "You are Haruhi."


def _cpu(monkeypatch, fast_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: fast_bf16)


def _args(*flags: str):
    return parse_args(["--do_train", "--output_dir", "unused", *flags])


# ---- precision ----

@pytest.mark.parametrize("flags, fast, expect", [
    ((), True, {"bf16": True, "fp16": False, "use_cpu": True}),  # default on a fast-bf16 CPU: bf16 autocast
    ((), False, {"bf16": False, "fp16": False}),
    (("--fp16",), True, {"bf16": True, "fp16": False, "use_cpu": True}),  # fp16 needs a GPU: bf16 instead
    (("--fp16",), False, {"bf16": False, "fp16": False}),  # ... or fp32
    (("--bf16", "false"), True, {"bf16": False, "fp16": False}),  # the user chose
])
def test_resolve_precision_returns_new_options_and_leaves_args_alone(monkeypatch, flags, fast, expect):
    _cpu(monkeypatch, fast)
    args = _args(*flags)
    before = copy.deepcopy(args.training.to_dict())
    training = setup.resolve_precision(args)
    assert {k: getattr(training, k) for k in expect} == expect
    assert args.training.to_dict() == before


@pytest.mark.parametrize("flags, fast, warns", [
    (("--bf16", "true"), False, True),  # asked for on a CPU that emulates bf16
    (("--bf16", "true"), True, False),
    (("--bf16", "false"), False, False),
    ((), False, False),
])
def test_bf16_on_a_cpu_without_fast_bf16_warns_once_with_the_reason(monkeypatch, caplog, flags, fast, warns):
    _cpu(monkeypatch, fast)
    setup.warn_slow_bf16.cache_clear()
    args = _args(*flags)
    with caplog.at_level("WARNING", logger="tunelab.setup"):
        for _ in range(2):
            training = setup.resolve_precision(args)
    assert training.bf16 == ("true" in flags)  # the user's choice stands
    messages = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(messages) == (1 if warns else 0)
    assert not warns or ("AVX512-BF16" in messages[0] and ">20x slower than fp32" in messages[0])


def test_training_args_add_tunelab_settings_to_the_resolved_precision(monkeypatch):
    _cpu(monkeypatch, True)
    args = _args()
    training = setup.training_args(args)
    assert (training.remove_unused_columns, training.report_to, training.bf16) == (False, [], True)
    assert (args.training.remove_unused_columns, args.training.bf16) == (True, False)


def test_autocast_follows_the_resolved_precision():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with setup.autocast(_args("--bf16", "true")):
        assert torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    with setup.autocast(_args("--bf16", "false")):
        assert not torch.is_autocast_enabled(device)


def test_generation_preset_fills_only_what_no_flag_set():
    args = parse_args(["--generation_preset", "seed2023", "--temperature", "0.5"])
    g = args.generation
    assert (g.do_sample, g.top_p, g.max_length, g.temperature) == (True, 0.7, 768, 0.5)


# ---- options a checkpoint's run decided ----

def test_inherit_returns_the_checkpoints_options_and_keeps_explicit_ones(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    recorded = {"template": "plain", "source_prefix": PREFIX, "max_source_length": 64, "dataset": "other"}
    (ckpt / "tunelab_args.json").write_text(json.dumps(recorded), encoding="utf-8")
    args = parse_args(["--template", "chatglm"])
    data = setup.inherit_from_checkpoint(args, [str(ckpt)])
    assert (data.template, data.source_prefix, data.max_source_length) == ("chatglm", PREFIX, 64)
    assert data.dataset is None  # only prompt-format options are inherited
    assert (args.data.template, args.data.source_prefix, args.data.max_source_length) == ("chatglm", None, 512)
    assert setup.inherit_from_checkpoint(args, []) is args.data


def test_decoding_record_names_the_sampling_settings_only_when_sampling():
    greedy = setup.decoding_record(parse_args([]))
    assert greedy == {"generation_preset": None, "do_sample": False, "num_beams": 1, "max_new_tokens": 256,
                      "max_length": None, "repetition_penalty": 1.0}
    sampled = setup.decoding_record(parse_args(["--do_sample", "true", "--temperature", "0.5", "--seed", "7"]))
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.5, 0.7, 50, 7)


def test_cache_key_is_stable_and_tells_parts_apart():
    assert cache_key({"a": 1, "b": [2]}, "x") == cache_key({"b": [2], "a": 1}, "x")
    assert cache_key({"a": 1}, "x") != cache_key({"a": 1}, "y")
    assert len(cache_key(1)) == 24


# ---- base model + checkpoints ----

@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory):
    return make_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora"), source_prefix=PREFIX)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits


def test_setup_model_loads_the_recorded_base_inherits_and_merges(tiny_llama_dir, lora_dir):
    args = parse_args(["--checkpoint_dir", str(lora_dir)])
    loaded = setup.setup_model(args, "eval")
    assert loaded.base_path == str(tiny_llama_dir)  # from the checkpoint: no --model_name_or_path given
    assert loaded.checkpoints == [str(lora_dir)] and loaded.method["finetuning_type"] == "lora"
    assert loaded.args.data.source_prefix == PREFIX and args.data.source_prefix is None
    assert type(loaded.model).__name__ == "LlamaForCausalLM"  # the adapter is merged into the weights
    base, _, path = setup.load_base(args.model, [str(lora_dir)])
    assert path == loaded.base_path
    assert not torch.allclose(_logits(base), _logits(loaded.model), atol=1e-4)  # the checkpoint counts


def test_setup_model_for_training_keeps_its_options_and_can_keep_the_adapter(tiny_llama_dir, lora_dir):
    args = parse_args(["--model_name_or_path", str(tiny_llama_dir), "--checkpoint_dir", str(lora_dir)])
    loaded = setup.setup_model(args, "train", merge=False)
    assert loaded.args is args and loaded.args.data.source_prefix is None
    assert type(loaded.model).__name__ == "PeftModelForCausalLM"  # the last LoRA stays a live adapter
    plain = setup.setup_model(parse_args(["--model_name_or_path", str(tiny_llama_dir)]), "eval")
    assert plain.checkpoints == [] and plain.method == {"finetuning_type": "none"}


def test_eval_merges_lora_into_the_weights_with_the_live_adapters_outputs(lora_dir):
    """Eval runs the LoRA checkpoint merged into the base (no adapter matmuls per step): the same logits as
    the live adapter, up to float rounding (issue 15)."""
    args = parse_args(["--checkpoint_dir", str(lora_dir)])
    merged = setup.setup_model(args, "eval").model.eval()
    live = setup.setup_model(args, "eval", merge=False).model.eval()
    assert type(live).__name__ == "PeftModelForCausalLM" and type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(merged), _logits(live), atol=1e-5, rtol=1e-5)
