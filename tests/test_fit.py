"""tunelab/methods/fit.py: a checkpoint of another model, shape, method or method setting is refused in one
line before any model loads (the loaders fail the test if called), from metadata only; a checkpoint that fits
passes, including one saved before the base's shape was recorded."""

import json

import pytest
import torch
from test_faults import assert_one_line_error, no_model  # noqa: F401  (no_model is a fixture)
from transformers import AutoModelForCausalLM

from tunelab import integrity
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.hparams import FinetuningArguments, ModelArguments
from tunelab.methods import METHOD_FILE, model_to_load, prepare_model, save_trainable
from tunelab.methods.fit import base_shape, check_checkpoints, describe, shape_difference, tensor_shapes

METHOD_OPTIONS = {"lora": dict(lora_target="qkv"), "freeze": dict(num_layer_trainable=2),
                  "p_tuning": dict(pre_seq_len=4), "full": {}}


def make_checkpoint(model_dir, out, method, record_shape=True, **options):
    """A checkpoint of `method` on the model in model_dir, saved as a run saves it (no training needed)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ft = FinetuningArguments(finetuning_type=method, **{**METHOD_OPTIONS[method], **options})
    model, info = prepare_model(model, ft)
    save_trainable(model, out, info, str(model_dir))
    if not record_shape:  # as saved before tunelab_method.json recorded the base's shape
        meta = json.loads((out / METHOD_FILE).read_text())
        del meta["base_shape"]
        (out / METHOD_FILE).write_text(json.dumps(meta))
    return out


def test_base_shape_and_its_differences(tiny_model_factory):
    from transformers import AutoConfig

    llama = base_shape(AutoConfig.from_pretrained(tiny_model_factory("llama", 4)))
    gpt2 = base_shape(AutoConfig.from_pretrained(tiny_model_factory("gpt2", 4)))
    assert llama == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4,
                     "vocab_size": llama["vocab_size"]}
    assert gpt2["hidden_size"] == 32 and gpt2["num_hidden_layers"] == 4  # n_embd / n_layer read through the map
    assert describe(llama) == f"llama, hidden 32, 4 layers, vocab {llama['vocab_size']}"
    assert shape_difference(llama, gpt2) == "model_type llama there, gpt2 here"
    assert shape_difference(llama, {**llama, "num_hidden_layers": 2}) == "num_hidden_layers 4 there, 2 here"
    assert shape_difference(llama, {"hidden_size": 32}) is None  # only fields both records hold


def test_tensor_shapes_reads_the_header_only(tiny_llama_dir, tmp_path):
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "lora", "lora", lora_rank=4)
    shapes = tensor_shapes(ckpt / "adapter_model.safetensors")
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (16, 4)  # 2 kv heads x 8


@pytest.mark.parametrize("method", ["lora", "freeze", "p_tuning"])
def test_a_checkpoint_fits_its_own_model_and_records_its_shape(tiny_llama_dir, tmp_path, method):
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / method, method)
    assert json.loads((ckpt / METHOD_FILE).read_text())["base_shape"]["num_hidden_layers"] == 4
    check_checkpoints(ModelArguments(), [str(ckpt)])  # the recorded base
    check_checkpoints(ModelArguments(model_name_or_path=str(tiny_llama_dir)), [str(ckpt)])


# (method, model it is applied to, shape recorded, what the one line must say)
MISFITS = [
    ("lora", ("llama", 2), True, "trained on llama, hidden 32, 4 layers, vocab"),
    ("lora", ("llama", 2), True, "does not fit: num_hidden_layers 4 there, 2 here"),
    ("lora", ("qwen2", 4), True, "model_type llama there, qwen2 here"),  # same shapes, another model
    ("lora", ("llama", 2), False, "it adapts model.layers.2.self_attn.k_proj, which this model does not have"),
    ("lora", ("gpt2", 4), False, "it adapts model.layers.0.self_attn.k_proj, which this model does not have"),
    ("freeze", ("llama", 2), False, "it holds model.layers.2."),
    ("freeze", ("gpt2", 4), False, "which this model does not have"),
    ("p_tuning", ("llama", 2), False, "its prefix is for 4 layers x kv width 16, the model has 2 x 16"),
    ("p_tuning", ("gpt2", 4), False, "its prefix is for 4 layers x kv width 16, the model has 4 x 32"),
]


@pytest.mark.parametrize("method, target, record, message", MISFITS,
                         ids=[f"{m}-{t[0]}{t[1]}-{'recorded' if r else 'old'}" for m, t, r, _ in MISFITS])
@pytest.mark.parametrize("command", ["predict", "chat"])
def test_a_checkpoint_of_another_model_is_one_line_before_loading(tiny_model_factory, tiny_data_dir, tmp_path,
                                                                  no_model, capsys, method, target, record,
                                                                  message, command):
    ckpt = make_checkpoint(tiny_model_factory("llama", 4), tmp_path / "ckpt", method, record_shape=record)
    other = tiny_model_factory(*target)
    out = tmp_path / "eval"
    argv = [command, "--checkpoint_dir", str(ckpt), "--model_name_or_path", str(other)]
    if command == "predict":
        argv += ["--dataset", "tiny", "--dataset_dir", str(tiny_data_dir), "--output_dir", str(out)]
    line = assert_one_line_error(capsys, main(argv), message, command)
    assert f"checkpoint {ckpt}" in line and f"cannot be applied to the model {other}" in line
    assert not out.exists()


def test_a_full_checkpoint_is_the_model_and_must_fit_the_base_named(tiny_model_factory, tmp_path):
    llama4 = tiny_model_factory("llama", 4)
    ckpt = str(make_checkpoint(llama4, tmp_path / "full", "full"))
    # --model_name_or_path names the base: the full checkpoint is still what loads (it used to be ignored)
    assert model_to_load(str(llama4), [ckpt]) == ckpt and model_to_load(str(llama4), []) == str(llama4)
    check_checkpoints(ModelArguments(model_name_or_path=str(llama4)), [ckpt])
    with pytest.raises(TunelabError, match=r"\(full fine-tuning, llama, hidden 32, 4 layers.*is not a fine-tune of "
                                           r"--model_name_or_path .*num_hidden_layers 2 there, 4 here"):
        check_checkpoints(ModelArguments(model_name_or_path=str(tiny_model_factory("llama", 2))), [ckpt])


def test_a_damaged_method_record_is_one_line(tiny_llama_dir, tmp_path):
    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "lora", "lora")
    (ckpt / METHOD_FILE).write_text('{"finetuning_type": "lo')
    with pytest.raises(TunelabError, match="tunelab_method.json is unreadable or names no finetuning_type"):
        check_checkpoints(ModelArguments(), [str(ckpt)])


# ---- resume ----

def _resume_argv(model_dir, data_dir, out, method, *extra):
    return ["train", "--do_train", "--model_name_or_path", str(model_dir), "--dataset", "tiny", "--dataset_dir",
            str(data_dir), "--output_dir", str(out), "--finetuning_type", method, "--max_steps", "8", "--bf16",
            "false", "--resume_from_checkpoint", "true", *extra]


def _trainer_checkpoint(model_dir, out, method, **options):
    folder = make_checkpoint(model_dir, out / "checkpoint-4", method, **options)
    (folder / "trainer_state.json").write_text("{}")
    integrity.mark_complete(folder, 4)
    return folder


@pytest.mark.parametrize("method, options, flags, message", [
    ("lora", {}, ["--finetuning_type", "freeze"],
     "is a LoRA checkpoint (lora); this run trains --finetuning_type freeze: resume with --finetuning_type lora"),
    ("p_tuning", {}, ["--finetuning_type", "lora"], "is a P-Tuning v2 checkpoint (p_tuning)"),
    ("lora", {"lora_rank": 8}, ["--lora_rank", "4"], "was trained with lora_rank 8; this run asks for 4 (--lora_rank)"),
    ("lora", {}, ["--lora_target", "mlp"], "trained 12 modules, this run targets 12"),
    ("lora", {}, ["--target_layers", "last:2"], "trained 12 modules, this run targets 6"),
    ("p_tuning", {"pre_seq_len": 4}, ["--pre_seq_len", "8"], "was trained with pre_seq_len 4"),
    ("freeze", {}, ["--num_layer_trainable", "1"], "this run targets"),
])
def test_resume_with_another_method_or_setting_is_one_line(tiny_llama_dir, tiny_data_dir, tmp_path, no_model, capsys,
                                                           method, options, flags, message):
    out = tmp_path / "run"
    _trainer_checkpoint(tiny_llama_dir, out, method, **options)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = _resume_argv(tiny_llama_dir, tiny_data_dir, out, method, *flags)
    line = assert_one_line_error(capsys, main(argv), message)
    assert f"--resume_from_checkpoint {out / 'checkpoint-4'}" in line or "--resume_from_checkpoint: " in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_resume_on_another_model_is_one_line(tiny_model_factory, tiny_data_dir, tmp_path, no_model, capsys):
    out = tmp_path / "run"
    _trainer_checkpoint(tiny_model_factory("llama", 4), out, "lora")
    argv = _resume_argv(tiny_model_factory("llama", 2), tiny_data_dir, out, "lora", "--lora_target", "qkv")
    line = assert_one_line_error(capsys, main(argv), "num_hidden_layers 4 there, 2 here")
    assert line.strip().startswith("--resume_from_checkpoint: checkpoint ")
