"""End to end through the CLI on tiny models: every method trains with falling loss and writes the
expected files; resume continues a killed run; bad input fails before anything is written."""

import json

import pytest

from tunelab.cli import main
from tunelab.hparams import TunelabError, parse_args
from tunelab.methods import get_method, method_names
from tunelab.train import run

METHOD_FLAGS = {  # one row per registered method that trains: flags that make its loss fall clearly in 6 epochs
    "lora": ["--lora_target", "qkv", "--learning_rate", "2e-2"],
    "freeze": ["--num_layer_trainable", "2", "--name_module_trainable", "mlp", "--learning_rate", "2e-2"],
    "p_tuning": ["--pre_seq_len", "4", "--learning_rate", "2e-1"],
    "full": ["--learning_rate", "5e-3"],
}


def train_argv(model_dir, data_dir, out, method="lora", *extra):
    return ["--do_train", "--model_name_or_path", str(model_dir), "--dataset", "tiny", "--dataset_dir",
            str(data_dir), "--finetuning_type", method, "--output_dir", str(out), "--per_device_train_batch_size",
            "4", "--num_train_epochs", "6", "--logging_steps", "2", "--save_steps", "1000", "--lr_scheduler_type",
            "constant", "--seed", "0", "--bf16", "false", "--template", "auto", "--plot_loss",
            *METHOD_FLAGS[method], *extra]


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.mark.parametrize("method", method_names(lambda m: m.trains))
def test_each_method_trains_and_writes_its_files(tiny_llama_dir, tiny_data_dir, tmp_path, method):
    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, method)))
    curve = losses(out)
    # deterministic data seen repeatedly: the loss must fall clearly, not just wobble
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.05 and min(curve[-2:]) < min(curve[:2]), curve
    for name in ("train_results.json", "all_results.json", "trainer_state.json", "tunelab_args.json",
                 "env.json", "trainable.json", "tunelab_method.json", "training_loss.png",
                 get_method(method).weight_files[0]):
        assert (out / name).is_file(), name
    results = json.loads((out / "train_results.json").read_text())
    assert {"epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second"} <= set(results)
    pickles = [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not pickles, pickles


def test_seed_command_verbatim_on_gpt2(tiny_model_factory, tiny_data_dir, tmp_path, capsys):
    """The 2023 log's flags (incl. --fp16 and layer-prefixed ChatGLM names) on a fused-qkv model."""
    out = tmp_path / "yui_lora"
    argv = ["train", "--do_train", "--model_name_or_path", str(tiny_model_factory("gpt2")), "--dataset", "tiny",
            "--dataset_dir", str(tiny_data_dir), "--finetuning_type", "lora", "--output_dir", str(out),
            "--overwrite_cache", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--lr_scheduler_type", "cosine", "--logging_steps", "10", "--save_steps", "1000", "--learning_rate",
            "5e-5", "--weight_decay", "1e-4", "--num_train_epochs", "1.0", "--lora_target",
            "2.attention.query_key_value,3.attention.query_key_value", "--source_prefix", "You are Yui.",
            "--plot_loss", "--fp16"]
    assert main(argv) == 0
    assert "trainable params: " in capsys.readouterr().out
    meta = json.loads((out / "tunelab_method.json").read_text())
    assert meta["modules"] == ["transformer.h.2.attn.c_attn", "transformer.h.3.attn.c_attn"]


def test_resume_after_kill_continues(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    full = train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--save_steps", "4", "--max_steps", "8")
    run(parse_args(full[:-4] + ["--save_steps", "4", "--max_steps", "4"]))  # the "killed" run stopped at step 4
    assert (out / "checkpoint-4" / "optimizer.safetensors").is_file()
    run(parse_args(full + ["--resume_from_checkpoint", "true"]))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == sorted(set(steps)) and steps[0] == 2


@pytest.mark.parametrize("bad, message", [
    (["--dataset", "nope"], "nope"),
    (["--finetuning_type", "adapter"], "choose from"),
    (["--lora_target", "no_such_module"], "self_attn"),
    (["--target_layers", "7-9"], "4 layers"),
    (["--do_eval"], "--val_size"),
    (["--do_predict"], "exactly one"),
])
def test_bad_input_fails_before_writing(tiny_llama_dir, tiny_data_dir, tmp_path, bad, message):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, tiny_data_dir, out, "lora") + bad
    with pytest.raises(TunelabError, match=message):
        run(parse_args(argv))
    assert not out.exists()


def test_used_output_dir_needs_overwrite(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(TunelabError, match="overwrite_output_dir"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out)))


def test_cli_error_is_one_line(tiny_data_dir, capsys):
    assert main(["train", "--do_train", "--lora_targte", "qkv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora_target" in err


def test_bf16_true_parses_on_a_cpu_machine(monkeypatch):
    """transformers refuses --bf16 without a GPU unless --use_cpu is set: tunelab adds it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = parse_args(["--do_train", "--output_dir", "x", "--bf16", "true"])
    assert args.training.bf16 and args.training.use_cpu
    assert not parse_args(["--do_train", "--output_dir", "x", "--bf16", "false"]).training.bf16


def test_train_ends_saying_where_the_outputs_are_and_what_to_run_next(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                       capsys):
    import shlex

    from tunelab.hparams import parse_args as parse

    out = tmp_path / "run"
    assert main(["train", *train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--max_steps", "1")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith(f"outputs in {out}/") and "adapter_model.safetensors" in lines[-2]
    command = lines[-1].split(": ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["tunelab", "predict"] and argv[argv.index("--checkpoint_dir") + 1] == str(out)
    predict = parse(argv[2:] + ["--do_predict"])  # the printed command parses as it stands
    assert predict.data.dataset == "tiny" and predict.generation.compare_base


@pytest.mark.parametrize("dataset, scored_on", [("persona_chat_en_train", "persona_chat_en_test"),
                                                ("alpaca_gpt4_en", "alpaca_gpt4_en")])
def test_next_command_scores_on_the_test_split_when_there_is_one(tmp_path, dataset, scored_on):
    from tunelab.train import next_command

    args = parse_args(["--do_train", "--dataset", dataset, "--output_dir", str(tmp_path / "r")])
    command = next_command(tmp_path / "r", args)
    assert f"--dataset {scored_on} " in command and "--dataset_dir" not in command


def test_run_files_get_the_users_umask_modes(tiny_llama_dir, tiny_data_dir, tmp_path):
    """Under umask 022 every file of a run and of its checkpoints is 0644 (safetensors alone writes 0600)."""
    import os
    import stat

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--max_steps", "2", "--save_steps",
                                  "1")))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert "adapter_model.safetensors" in modes and "checkpoint-1/optimizer.safetensors" in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, wrong


def test_recorded_supervised_tokens_are_the_rows_the_head_ran_over(tiny_llama_dir, tiny_data_dir, tmp_path):
    """train_supervised_tokens (the study's FLOP count of the output projection) equals the rows every training
    step sent through the head, counted by a forward hook, over several epochs."""
    import torch

    seen = []

    def count_head_rows(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.out_features == module_vocab[0] and torch.is_grad_enabled():
            seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0])

    from transformers import AutoConfig

    module_vocab = [AutoConfig.from_pretrained(tiny_llama_dir).vocab_size]
    out = tmp_path / "run"
    handle = torch.nn.modules.module.register_module_forward_hook(count_head_rows)
    try:
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--num_train_epochs", "3")))
    finally:
        handle.remove()
    results = json.loads((out / "train_results.json").read_text())
    assert len(seen) >= 3 and results["train_supervised_tokens"] == sum(seen)
