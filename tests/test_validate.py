"""Option ranges (tunelab/validate.py): every rule passes its option's default and refuses a value just
outside its range, naming the option; the output-dir check; valid inputs parse as before."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import TunelabError
from tunelab.hparams import parse_args
from tunelab.validate import RULES, SAMPLING_RULES, check_output_dir, steps, validate

# one value just outside the range of each rule (a new rule needs a row here: the test below checks)
OUTSIDE = {
    "max_samples": 0, "max_source_length": 0, "max_target_length": -1, "preprocessing_num_workers": 0,
    "lora_rank": 0, "lora_alpha": 0.0, "lora_dropout": 1.0, "pre_seq_len": 0, "num_layer_trainable": 0,
    "top_k": -1, "num_beams": 0, "max_new_tokens": 0, "max_length": 0, "repetition_penalty": 0.0,
    "max_generate_samples": 0, "generation_batch_tokens": -1, "likelihood_topk": 0, "per_device_train_batch_size": 0,
    "per_device_eval_batch_size": 0, "gradient_accumulation_steps": 0, "eval_accumulation_steps": 0,
    "learning_rate": math.nan, "num_train_epochs": -1.0, "max_steps": 0, "logging_steps": 0.0,
    "save_steps": 1.5, "eval_steps": -1.0, "warmup_steps": math.inf, "weight_decay": -0.1,
    "max_grad_norm": math.nan, "adam_beta1": 1.0, "adam_beta2": -0.1, "adam_epsilon": 0.0,
    "label_smoothing_factor": 1.0, "seed": 2 ** 32, "data_seed": -1, "dataloader_num_workers": -1,
    "generation_max_length": 0, "generation_num_beams": 0, "temperature": 0.0, "top_p": 0.0,
}


def test_every_rule_has_a_bad_value_row():
    assert {name for name, _, _ in RULES + SAMPLING_RULES} == set(OUTSIDE)


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_each_rule_refuses_a_value_outside_and_names_the_option(name):
    defaults = parse_args(["--do_train", "--output_dir", "x", "--do_sample", "true"]).to_dict()
    validate(defaults)  # the defaults are valid
    with pytest.raises(TunelabError, match=f"^--{name} must be .* \\(got "):
        validate({**defaults, name: OUTSIDE[name]})


def test_options_left_at_none_are_not_checked():
    validate({"max_samples": None, "eval_steps": None, "max_length": None})


def test_sampling_options_only_count_when_sampling():
    validate({"do_sample": False, "temperature": 0.0, "top_p": 0.0})


@pytest.mark.parametrize("value, ok", [(1, True), (500, True), (0.25, True), (2.0, True), (0, False),
                                       (1.5, False), (-1, False), (math.nan, False), (True, False)])
def test_step_options_take_integers_or_a_ratio(value, ok):
    assert steps(value) is ok


def test_zero_epochs_is_refused_only_when_no_max_steps_is_given():
    with pytest.raises(TunelabError, match="0 optimizer steps"):
        parse_args(["--do_train", "--output_dir", "x", "--num_train_epochs", "0"])
    args = parse_args(["--do_train", "--output_dir", "x", "--num_train_epochs", "0", "--max_steps", "3"])
    assert args.training.max_steps == 3
    parse_args(["--do_eval", "--output_dir", "x", "--num_train_epochs", "0"])  # eval trains nothing anyway


def test_hf_own_checks_become_one_line_errors():
    with pytest.raises(TunelabError) as err:
        parse_args(["--do_train", "--output_dir", "x", "--load_best_model_at_end", "true", "--eval_strategy", "no"])
    assert "\n" not in str(err.value)


def test_valid_values_parse_unchanged():
    args = parse_args(["--do_train", "--output_dir", "x", "--learning_rate", "2e-4", "--save_steps", "0.5",
                       "--lora_dropout", "0", "--max_samples", "1", "--num_layer_trainable", "-2"])
    assert (args.training.learning_rate, args.training.save_steps, args.finetune.lora_dropout,
            args.data.max_samples, args.finetune.num_layer_trainable) == (2e-4, 0.5, 0.0, 1, -2)


def test_output_dir_must_be_a_writable_folder(tmp_path):
    check_output_dir(tmp_path / "new" / "run")  # not there yet: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(TunelabError, match="is an existing file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(TunelabError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "run")
