"""Bad inputs, as a hostile first user types them, through the `tunelab` command (tunelab.cli.main): each ends
in exit code 2 and one line naming the option or file, never a traceback, with nothing written to the output
dir and no model loaded (the loaders fail the test if called). Then the faults that need a model: a
diverging run stops at the first non-finite step, and the CLI's handler itself (environment faults, bugs,
TUNELAB_DEBUG)."""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from tunelab.cli import main


@dataclass
class Ctx:
    """Paths a case builds its flags from; `tmp` is free for files a case writes."""

    model: Path
    data: Path
    out: Path
    tmp: Path


def data_with(ctx: Ctx, file_name: str, content: bytes | str, entry: dict | None = None) -> list[str]:
    """Flags for a data set 'bad' whose file holds `content` (registry entry `entry`, default: alpaca)."""
    folder = ctx.tmp / "bad_data"
    folder.mkdir(exist_ok=True)
    raw = content.encode("utf-8") if isinstance(content, str) else content
    (folder / file_name).write_bytes(raw)
    info = {"bad": {"file_name": file_name, **(entry or {})}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return ["--dataset", "bad", "--dataset_dir", str(folder)]


def config_with(ctx: Ctx, file_name: str, content: bytes | str) -> list[str]:
    """A config file as the first argument (the rest of the flags still follow it)."""
    path = ctx.tmp / file_name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return [str(path)]


def out_is_file(ctx: Ctx) -> list[str]:
    ctx.out.parent.mkdir(parents=True, exist_ok=True)
    ctx.out.write_text("not a folder")
    return []


def out_used(ctx: Ctx) -> list[str]:
    ctx.out.mkdir(parents=True)
    (ctx.out / "train_results.json").write_text("{}")
    return []


def out_below_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "afile").write_text("x")
    return ["--output_dir", str(ctx.tmp / "afile" / "run")]


def data_file_missing(ctx: Ctx) -> list[str]:
    flags = data_with(ctx, "x.json", "[]")
    (ctx.tmp / "bad_data" / "x.json").unlink()
    return flags


def registry_malformed(ctx: Ctx) -> list[str]:
    flags = data_with(ctx, "rows.json", "[]")
    (ctx.tmp / "bad_data" / "dataset_info.json").write_text('{"bad": {', encoding="utf-8")
    return flags


def hub_dataset(ctx: Ctx) -> list[str]:
    flags = data_with(ctx, "x.json", "[]")
    (ctx.tmp / "bad_data" / "dataset_info.json").write_text('{"bad": {"hf_hub_url": "tatsu-lab/alpaca"}}')
    return flags


def trainer_checkpoint(ctx: Ctx, damage: Callable[[Path], None] = lambda folder: None,
                       method: dict | None = None) -> list[str]:
    """A whole checkpoint-4 in the output dir (its completion marker written), then `damage` done to it."""
    from tunelab import integrity

    folder = ctx.out / "checkpoint-4"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if method is not None:
        (folder / "tunelab_method.json").write_text(json.dumps(method))
    integrity.mark_complete(folder, 4)
    damage(folder)
    return ["--resume_from_checkpoint", str(folder)]


def other_model_checkpoint(ctx: Ctx) -> list[str]:
    """A LoRA checkpoint whose record says it was trained on a wider model than ctx.model."""
    folder = ctx.tmp / "other_lora"
    folder.mkdir()
    shape = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "vocab_size": 320}
    (folder / "tunelab_method.json").write_text(json.dumps({"finetuning_type": "lora", "base_shape": shape}))
    return ["--checkpoint_dir", str(folder)]


ROW = {"instruction": "hi", "input": "", "output": "hello"}

# (id, flags or ctx -> flags, text the one-line error must hold); the flags follow a valid LoRA train command
CASES: list[tuple[str, list[str] | Callable[[Ctx], list[str]], str]] = [
    # ranges of tunelab's and HF's options
    ("batch_size_0", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1"),
    ("eval_batch_size_0", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    ("grad_accum_0", ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    ("lr_negative", ["--learning_rate", "-1"], "--learning_rate must be a finite number >= 0"),
    ("lr_nan", ["--learning_rate", "nan"], "--learning_rate"),
    ("lr_inf", ["--learning_rate", "inf"], "--learning_rate"),
    ("lr_text", ["--learning_rate", "fast"], "invalid float value"),
    ("epochs_0", ["--max_steps", "-1", "--num_train_epochs", "0"], "0 optimizer steps"),
    ("epochs_negative", ["--num_train_epochs", "-2"], "--num_train_epochs"),
    ("epochs_nan", ["--num_train_epochs", "nan"], "--num_train_epochs"),
    ("max_steps_0", ["--max_steps", "0"], "--max_steps must be an integer >= 1, or -1"),
    ("max_steps_negative", ["--max_steps", "-5"], "--max_steps"),
    ("max_steps_float", ["--max_steps", "2.5"], "invalid int value"),
    ("save_steps_0", ["--save_steps", "0"], "--save_steps"),
    ("save_steps_fraction_above_1", ["--save_steps", "2.5"], "--save_steps"),
    ("logging_steps_0", ["--logging_steps", "0"], "--logging_steps"),
    ("eval_steps_negative", ["--eval_steps", "-1"], "--eval_steps"),
    ("warmup_negative", ["--warmup_steps", "-1"], "--warmup_steps"),
    ("weight_decay_nan", ["--weight_decay", "nan"], "--weight_decay"),
    ("max_grad_norm_negative", ["--max_grad_norm", "-1"], "--max_grad_norm"),
    ("adam_beta2_1", ["--adam_beta2", "1"], "--adam_beta2 must be a number in [0, 1)"),
    ("seed_negative", ["--seed", "-1"], "--seed"),
    ("max_source_length_0", ["--max_source_length", "0"], "--max_source_length"),
    ("max_target_length_negative", ["--max_target_length", "-1"], "--max_target_length"),
    ("max_samples_negative", ["--max_samples", "-1"], "--max_samples"),
    ("max_samples_0", ["--max_samples", "0"], "--max_samples"),
    ("workers_0", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers"),
    ("lora_rank_0", ["--lora_rank", "0"], "--lora_rank"),
    ("lora_alpha_0", ["--lora_alpha", "0"], "--lora_alpha"),
    ("lora_dropout_2", ["--lora_dropout", "2"], "--lora_dropout must be a number in [0, 1)"),
    ("lora_dropout_negative", ["--lora_dropout", "-0.1"], "--lora_dropout"),
    ("pre_seq_len_0", ["--finetuning_type", "p_tuning", "--pre_seq_len", "0"], "--pre_seq_len"),
    ("freeze_layers_0", ["--finetuning_type", "freeze", "--num_layer_trainable", "0"], "--num_layer_trainable"),
    ("max_new_tokens_0", ["--max_new_tokens", "0"], "--max_new_tokens"),
    ("num_beams_0", ["--num_beams", "0"], "--num_beams"),
    ("temperature_0_sampling", ["--do_sample", "true", "--temperature", "0"], "--temperature"),
    ("top_p_above_1", ["--do_sample", "true", "--top_p", "1.5"], "--top_p"),
    ("bool_text", ["--plot_loss", "maybe"], "plot_loss"),
    # names: options, methods, templates, presets, stages (good before; kept so)
    ("unknown_option", ["--lora_targte", "qkv"], "did you mean lora_target"),
    ("unknown_method", ["--finetuning_type", "adapter"], "choose from"),
    ("unknown_template", ["--template", "chatglm2"], "did you mean chatglm"),
    ("unknown_preset", ["--generation_preset", "fast"], "choose from"),
    ("two_stages", ["--do_eval"], "needs eval data"),
    ("unknown_target", ["--lora_target", "no_such_module"], "matches no module of this llama model"),
    ("layers_outside_model", ["--target_layers", "7-9"], "the model has 4 layers"),
    ("freeze_more_layers_than_model", ["--finetuning_type", "freeze", "--num_layer_trainable", "9"],
     "the model has 4 layers"),
    ("positional_junk", ["lora"], "options start with --"),
    # data sets: found, opened, parsed before the model loads
    ("unknown_dataset", ["--dataset", "alpaca_gtp4_en"], "unknown data set 'alpaca_gtp4_en'"),
    ("no_dataset", ["--dataset", ""], "--dataset is required"),
    ("dataset_dir_missing", lambda c: ["--dataset_dir", str(c.tmp / "nowhere")], "no dataset_info.json"),
    ("data_file_missing", lambda c: data_file_missing(c), "bad_data/x.json"),
    ("data_not_utf8", lambda c: data_with(c, "rows.json", b'[{"instruction": "caf\xe9", "output": "x"}]'),
     "rows.json:1: not UTF-8 text (byte 0xe9 at offset 21)"),
    ("data_malformed_json", lambda c: data_with(c, "rows.json", '[\n{"instruction": "a",\n "output": }\n]'),
     "rows.json:3: malformed JSON"),
    ("data_malformed_jsonl", lambda c: data_with(c, "rows.jsonl", json.dumps(ROW) + "\n{oops\n"),
     "rows.jsonl:2: malformed JSON"),
    ("history_as_string", lambda c: data_with(c, "rows.json", json.dumps([{**ROW, "history": "hi there"}])),
     "history must be a list of [user, assistant] pairs, got str"),
    ("csv_history_not_json", lambda c: data_with(c, "rows.csv", "instruction,output,history\nhi,yo,[oops\n"),
     "the history cell is not JSON"),
    ("all_rows_empty", lambda c: data_with(c, "rows.json", json.dumps([{**ROW, "output": ""}] * 3)),
     "gives no examples"),
    ("hub_dataset", lambda c: hub_dataset(c), "never downloads"),
    ("registry_malformed", lambda c: registry_malformed(c), "dataset_info.json:1: malformed JSON"),
    # config files
    ("config_malformed_json", lambda c: config_with(c, "cfg.json", '{\n"learning_rate": 1e-4,\n}'),
     "cfg.json:3: malformed JSON"),
    ("config_yaml_tab", lambda c: config_with(c, "cfg.yaml", "learning_rate: 1e-4\n\tlora_rank: 8\n"),
     "cfg.yaml:2: malformed YAML"),
    ("config_not_utf8", lambda c: config_with(c, "cfg.yaml", b"source_prefix: caf\xe9\n"), "not UTF-8 text"),
    ("config_unknown_key", lambda c: config_with(c, "cfg.yaml", "lora_rnak: 8\n"), "did you mean lora_rank"),
    ("config_not_mapping", lambda c: config_with(c, "cfg.yaml", "- lora_rank\n"), "must hold a mapping"),
    ("config_missing", lambda c: [str(c.tmp / "nope.yaml")], "config file not found"),
    ("config_bad_value", lambda c: config_with(c, "cfg.yaml", "lora_dropout: 1.5\n"), "--lora_dropout"),
    # the output folder and resuming
    ("output_dir_is_file", out_is_file, "is an existing file"),
    ("output_dir_below_file", out_below_file, "is a file, not a folder"),
    ("output_dir_used", out_used, "is not empty"),
    ("resume_missing", lambda c: ["--resume_from_checkpoint", str(c.tmp / "checkpoint-9")], "not found"),
    ("resume_without_trainer_state", lambda c: trainer_checkpoint(c, lambda f: (f / "trainer_state.json").unlink()),
     "checkpoint-4 is incomplete: trainer_state.json is missing"),
    ("resume_truncated_weights",
     lambda c: trainer_checkpoint(c, lambda f: (f / "adapter_model.safetensors").write_bytes(b"x" * 10)),
     "adapter_model.safetensors is 10 bytes, 100 when saved"),
    ("resume_another_method", lambda c: trainer_checkpoint(c, method={"finetuning_type": "p_tuning"}),
     "is a P-Tuning v2 checkpoint (p_tuning); this run trains --finetuning_type lora"),
    ("checkpoint_of_another_model", other_model_checkpoint,
     "does not fit: hidden_size 64 there, 32 here"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Model, tokenizer and tokenisation fail the test if anything asks for them."""
    import tunelab.model
    import tunelab.preprocess

    def forbidden(*args, **kwargs):
        pytest.fail("a model, tokenizer or tokenisation was asked for before the bad input was reported")

    for module, name in ((tunelab.model, "load_model_and_tokenizer"), (tunelab.model, "load_model"),
                         (tunelab.model, "load_tokenizer"), (tunelab.preprocess, "build_dataset")):
        monkeypatch.setattr(module, name, forbidden)


def files_under(path: Path) -> dict[str, bytes] | str | None:
    if path.is_file():
        return path.read_bytes().decode()
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} if path.is_dir() \
        else None


def good_train_argv(ctx: Ctx) -> list[str]:
    return ["--do_train", "--model_name_or_path", str(ctx.model), "--dataset", "tiny", "--dataset_dir",
            str(ctx.data), "--output_dir", str(ctx.out), "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--save_steps", "1000", "--bf16", "false", "--learning_rate", "1e-3"]


def assert_one_line_error(capsys, code: int, message: str, command: str = "train") -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    # a progress bar may share the error's line (it redraws with \r): the error is the text after its prefix
    lines = [line for line in re.split(r"[\r\n]", err) if f"tunelab {command}: error:" in line]
    assert len(lines) == 1 and message in lines[0], err
    return lines[0].split(f"tunelab {command}: error:", 1)[1]


@pytest.mark.parametrize("bad, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_llama_dir, tiny_data_dir, tmp_path, no_model,
                                                          capsys, bad, message):
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "runs" / "x", tmp_path)
    extra = bad(ctx) if callable(bad) else bad
    config = [a for a in extra[:1] if a.endswith((".json", ".yaml")) and not a.startswith("-")]
    before = files_under(ctx.out)
    code = main(["train", *config, *good_train_argv(ctx), *extra[len(config):]])
    assert_one_line_error(capsys, code, message)
    assert files_under(ctx.out) == before


def test_the_suite_covers_at_least_forty_bad_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command, bad, message", [
    ("predict", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    ("predict", ["--max_generate_samples", "0"], "--max_generate_samples"),
    ("eval", ["--dataset", "nope"], "unknown data set 'nope'"),
    ("eval", ["--do_train"], "does not train"),
])
def test_eval_and_predict_report_bad_input_before_loading(tiny_llama_dir, tiny_data_dir, tmp_path, no_model,
                                                          capsys, command, bad, message):
    out = tmp_path / "eval"
    code = main([command, "--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny", "--dataset_dir",
                 str(tiny_data_dir), "--output_dir", str(out), *bad])
    assert_one_line_error(capsys, code, message, command)
    assert not out.exists()


def test_an_overflowing_update_stops_the_run_at_once(tiny_llama_dir, tiny_data_dir, tmp_path, capsys):
    """--learning_rate 1e38 used to train on with NaN weights and exit 0: Adam's first step (~ lr in size)
    already overflows, so the run stops at step 1 and saves no NaN adapter."""
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "run", tmp_path)
    argv = good_train_argv(ctx) + ["--learning_rate", "1e38", "--max_steps", "6", "--lr_scheduler_type", "constant"]
    line = assert_one_line_error(capsys, main(["train", *argv]), "step 1: the update made a weight NaN/inf")
    assert "last checkpoint: none saved" in line and "--learning_rate (now 1e+38)" in line
    assert not list(ctx.out.glob("*.safetensors"))


def test_a_nonfinite_loss_stops_before_its_update_naming_the_last_checkpoint(tiny_llama_dir, tiny_data_dir,
                                                                             tmp_path, capsys):
    """lr 1e30: step 1's update is finite but huge, step 2's loss is NaN: stopped before that update."""
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "run", tmp_path)
    argv = good_train_argv(ctx) + ["--learning_rate", "1e30", "--max_steps", "6", "--lr_scheduler_type", "constant",
                                   "--save_steps", "1"]
    line = assert_one_line_error(capsys, main(["train", *argv]), "step 2: the loss or a gradient is not finite")
    assert f"last checkpoint: {ctx.out / 'checkpoint-1'}" in line and "--skip_nonfinite true" in line
    assert not list(ctx.out.glob("*.safetensors")) and not (ctx.out / "checkpoint-2").exists()


def test_skip_nonfinite_trains_through_and_keeps_the_weights_finite(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                    caplog):
    import torch
    from safetensors.torch import load_file

    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "run", tmp_path)
    argv = good_train_argv(ctx) + ["--learning_rate", "1e30", "--max_steps", "4", "--lr_scheduler_type", "constant",
                                   "--skip_nonfinite", "true"]
    assert main(["train", *argv]) == 0
    assert "step 2: non-finite loss or gradient: step skipped" in caplog.text
    weights = load_file(ctx.out / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _command_raising(monkeypatch, err: BaseException) -> None:
    import tunelab.train

    def run(args):
        raise err

    monkeypatch.setattr(tunelab.train, "run", run)


@pytest.mark.parametrize("err, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/adapter_model.safetensors"),
     "the disk is full: /runs/x/adapter_model.safetensors"),
    (OSError(errno.EROFS, "Read-only file system", "/runs/x"), "the file system is read-only: /runs/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "no permission: /runs/x"),
    (json.JSONDecodeError("Expecting value", "{\n,", 2), "malformed JSON at line 2"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text"),
    (yaml.scanner.ScannerError(problem="found a tab"), "malformed YAML: found a tab"),
    (torch.OutOfMemoryError("CUDA out of memory"), "out of memory: lower --per_device_train_batch"),
])
def test_environment_faults_are_one_line(monkeypatch, capsys, err, message):
    _command_raising(monkeypatch, err)
    assert_one_line_error(capsys, main(["train", "--do_train"]), message)


def test_a_bug_still_shows_its_traceback(monkeypatch):
    _command_raising(monkeypatch, KeyError("oops"))
    with pytest.raises(KeyError):
        main(["train", "--do_train"])


def test_tunelab_debug_prints_the_traceback_too(monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_DEBUG", "1")
    _command_raising(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert main(["train", "--do_train"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("the disk is full: /x (OSError)")


# ---- eval / predict record how they ended (run_status.json), as training does ----

def _predict_argv(ctx: Ctx) -> list[str]:
    return ["predict", "--model_name_or_path", str(ctx.model), "--dataset", "tiny", "--dataset_dir", str(ctx.data),
            "--output_dir", str(ctx.out), "--max_samples", "2", "--max_new_tokens", "2", "--bf16", "false"]


def test_predict_marks_its_run_done(tiny_llama_dir, tiny_data_dir, tmp_path):
    from tunelab import integrity

    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "eval", tmp_path)
    assert main(_predict_argv(ctx)) == 0
    status = integrity.read_status(ctx.out)
    assert status["status"] == "done" and status["error"] is None and (ctx.out / "predict_results.json").is_file()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/eval/likelihood.jsonl")


def _terminated(*args, **kwargs):
    import os
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises at once: this never finishes
    pytest.fail("SIGTERM did not stop the eval at once")


@pytest.mark.parametrize("fault, code, status, message", [
    (_disk_full, 2, "failed", "the disk is full: /runs/eval/likelihood.jsonl"),
    (_terminated, 143, "interrupted", "interrupted by SIGTERM: stopped; run the same command again"),
])
def test_a_failed_or_interrupted_predict_says_so_in_run_status(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                               capsys, fault, code, status, message):
    import signal

    import tunelab.evaluate
    from tunelab import integrity

    monkeypatch.setattr(tunelab.evaluate, "score_likelihood", fault)  # fails while scoring, after the model loaded
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "eval", tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    assert main(_predict_argv(ctx)) == code
    assert message in capsys.readouterr().err
    recorded = integrity.read_status(ctx.out)
    assert recorded["status"] == status and recorded["error"]
    assert not (ctx.out / "predict_results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handlers are gone again


def test_a_failure_in_a_joint_eval_marks_every_set_failed(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch):
    """run_evals of two sets (one model, one generation): the second set's scoring fails, so neither set has
    results and both run_status.json say failed with the error."""
    import tunelab.evaluate
    from tunelab import integrity
    from tunelab.hparams import parse_args
    from tunelab.train import run_evals

    real, calls = tunelab.evaluate.score_likelihood, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            _disk_full()
        return real(*a, **k)

    monkeypatch.setattr(tunelab.evaluate, "score_likelihood", second_fails)
    outs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(OSError):
        run_evals([parse_args(_predict_argv(Ctx(tiny_llama_dir, tiny_data_dir, out, tmp_path))[1:] + ["--do_predict"])
                   for out in outs])
    for out in outs:
        recorded = integrity.read_status(out)
        assert recorded["status"] == "failed" and "No space left" in recorded["error"]
        assert not (out / "predict_results.json").exists()


# ---- what peft refuses: one line at the call site, naming the options or the checkpoint ----

def test_a_lora_setup_peft_refuses_is_one_line_naming_the_options(tiny_llama_dir, tiny_data_dir, tmp_path, no_model,
                                                                  monkeypatch, capsys):
    """A module type peft cannot adapt (an RMSNorm) getting past target resolution: peft's ValueError becomes
    one line, on the weightless model, before the real one loads."""
    import tunelab.methods.lora

    monkeypatch.setattr(tunelab.methods.lora, "resolve_modules", lambda *args: ["model.norm"])
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "run", tmp_path)
    line = assert_one_line_error(capsys, main(["train", *good_train_argv(ctx), "--lora_target", "qkv"]),
                                 "peft refused the LoRA set-up (--lora_target qkv, 1 modules, --lora_rank 8")
    assert "is not supported" in line and not ctx.out.exists()


@pytest.mark.parametrize("config, kind", [
    ('{"peft_type": "LORA", "r": 8,', "JSONDecodeError"),  # truncated
    ('{"peft_type": "NOPE"}', "KeyError"),
    (None, "TypeError"),  # r given as text
])
def test_a_damaged_adapter_config_is_one_line_naming_the_checkpoint(tiny_llama_dir, tiny_data_dir, tmp_path, capsys,
                                                                     config, kind):
    from test_fit import make_checkpoint

    ckpt = make_checkpoint(tiny_llama_dir, tmp_path / "lora", "lora")
    path = ckpt / "adapter_config.json"
    path.write_text(config or json.dumps({**json.loads(path.read_text()), "r": "eight"}))
    ctx = Ctx(tiny_llama_dir, tiny_data_dir, tmp_path / "eval", tmp_path)
    line = assert_one_line_error(capsys, main([*_predict_argv(ctx), "--checkpoint_dir", str(ckpt)]),
                                 f"checkpoint {ckpt}: peft cannot load its LoRA adapter", "predict")
    assert f"adapter_config.json: {kind}" in line
