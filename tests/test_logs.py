"""Quiet, clean command output: known upstream warnings filtered by message (others still show), and progress
as periodic lines when stderr is not a terminal."""

import io
import logging
import warnings

import pytest

from tunelab import logs


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_known_warnings_are_filtered_by_message_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_get_peft_model_on_gpt2_warns_nothing_once_quieted(tiny_model_factory):
    """peft's is_gradient_checkpointing read is filtered; its Conv1D fan_in_fan_out warning cannot happen
    (tunelab sets the flag for GPT-2's transposed weights)."""
    from transformers import AutoModelForCausalLM

    from tunelab.hparams import FinetuningArguments
    from tunelab.methods import prepare_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.quiet_known_warnings()
        model, _ = prepare_model(model, FinetuningArguments(finetuning_type="lora", lora_target="qkv"))
    assert not [str(w.message) for w in caught if "peft" in w.filename or "transformers" in w.filename]
    assert model.peft_config["default"].fan_in_fan_out


@pytest.mark.parametrize("stream, preset, expected", [
    (io.StringIO(), {}, "1"),  # a log file: library bars off
    (io.StringIO(), {"HF_HUB_DISABLE_PROGRESS_BARS": "0"}, "0"),  # the user's setting wins
    (_Tty(), {}, None),  # a terminal keeps its bars
])
def test_setup_command_logs_turns_library_bars_off_off_a_terminal(stream, preset, expected):
    environ = dict(preset)
    logs.setup_command_logs(environ, stream)
    assert environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == expected
    assert environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == (None if expected is None else "1")


def test_trainer_progress_prints_lines_off_a_terminal():
    from tunelab.hparams import parse_args

    training = parse_args(["--do_train", "--output_dir", "x"]).training
    assert logs.trainer_progress(training, frozenset(), io.StringIO()).disable_tqdm
    assert not logs.trainer_progress(training, frozenset(), _Tty()).disable_tqdm
    assert not logs.trainer_progress(training, frozenset({"disable_tqdm"}), io.StringIO()).disable_tqdm


def test_line_progress_logs_a_line_per_interval_and_one_at_the_end(caplog):
    now = [0.0]
    bar = logs.LineProgress(total=10, desc="generate", unit="sample", every=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tunelab.logs"):
        for _ in range(9):
            now[0] += 10
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["generate: 3/10 samples, 30 s, 0.10 sample/s", "generate: 6/10 samples, 60 s, 0.10 sample/s",
                     "generate: 9/10 samples, 90 s, 0.10 sample/s", "generate: 9/10 samples, 90 s, 0.10 sample/s"]
    assert all("\r" not in line for line in lines)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert isinstance(logs.progress(5, "x", stream=io.StringIO()), logs.LineProgress)
    assert not isinstance(logs.progress(5, "x", stream=_Tty()), logs.LineProgress)
    assert not isinstance(logs.progress(5, "x", disable=True, stream=io.StringIO()), logs.LineProgress)
