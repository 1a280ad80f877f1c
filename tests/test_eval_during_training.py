"""Eval during training (--do_train --do_eval): --val_size holds out a seeded, disjoint part of the training rows
(or --eval_dataset gives the eval rows), eval loss lands in trainer_state.json, eval_results.json and the loss
plot; early stopping stops; the best checkpoint is loaded at the end; bad combinations fail before anything
loads."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from test_train import train_argv

from tunelab.hparams import TunelabError, parse_args
from tunelab.plotting import loss_points
from tunelab.preprocess import split_for_eval, val_count
from tunelab.train import run


def _rows(n: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i] for i in range(n)]})


def _ids(ds: Dataset) -> list[int]:
    return [row[0] for row in ds["input_ids"]]


@pytest.mark.parametrize("val_size, rows, count", [(0.25, 16, 4), (0.1, 16, 2), (3, 16, 3), (0, 16, 0)])
def test_val_count_is_a_rounded_up_fraction_or_a_number(val_size, rows, count):
    assert val_count(val_size, rows) == count


@pytest.mark.parametrize("val_size", [16, 20, 0.999])
def test_val_size_that_leaves_nothing_to_train_on_is_refused(val_size):
    with pytest.raises(TunelabError, match=r"--val_size .* of the 16 training rows"):
        val_count(val_size, 16)


def test_split_is_deterministic_and_disjoint():
    train, held = split_for_eval(_rows(20), 0.25, seed=3)
    assert len(held) == 5 and sorted(_ids(train) + _ids(held)) == list(range(20))  # disjoint, nothing lost
    again_train, again_held = split_for_eval(_rows(20), 0.25, seed=3)
    assert _ids(again_held) == _ids(held) and _ids(again_train) == _ids(train)
    assert _ids(split_for_eval(_rows(20), 0.25, seed=4)[1]) != _ids(held)  # the seed picks the rows


@pytest.mark.parametrize("flags, message", [
    (["--do_eval"], "needs eval data: --val_size"),
    (["--eval_strategy", "steps"], "needs eval data"),  # an eval strategy implies --do_eval
    (["--do_eval", "--val_size", "1.5"], "whole number"),
    (["--do_eval", "--val_size", "-0.1"], "fraction"),
    (["--do_eval", "--val_size", "0.1", "--eval_dataset", "tiny"], "not both"),
    (["--early_stopping_patience", "2"], "--eval_strategy steps"),
])
def test_bad_eval_options_fail_at_parse_time(flags, message):
    with pytest.raises(TunelabError, match=message):
        parse_args(["--do_train", "--output_dir", "unused", *flags])


def test_val_size_beyond_the_data_set_fails_before_anything_loads(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                  monkeypatch):
    from tunelab import setup

    monkeypatch.setattr(setup, "load_base", lambda *a: pytest.fail("the model must not load"))
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match="--val_size 16 holds out 16 of the 16 training rows"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--do_eval", "--val_size", "16")))
    assert not out.exists()


def _state(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_eval_loss_during_training_in_state_results_and_plot(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    metrics = run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--do_eval", "--val_size", "4",
                                        "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "4")))
    steps, losses = loss_points(_state(out), "eval_loss")
    assert steps == [2, 4, 4] and all(loss > 0 for loss in losses)  # two evaluations + the final one
    assert losses[-1] == pytest.approx(losses[-2])  # the final eval is of the same (last) model
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == metrics["eval_loss"]
    assert (out / "training_loss.png").is_file()


def test_eval_dataset_instead_of_a_held_out_part(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    metrics = run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--do_eval", "--eval_dataset",
                                        "tiny", "--max_samples", "8", "--max_steps", "2")))
    assert metrics["eval_samples_per_second"] > 0 and metrics["eval_loss"] > 0


def test_early_stopping_stops(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    # learning rate 0: the eval loss never improves, so patience 1 stops at the second evaluation (step 4 of 12)
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--do_eval", "--val_size", "4",
                              "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "12",
                              "--learning_rate", "0", "--early_stopping_patience", "1")))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_load_best_model_at_end_restores_the_best_checkpoint(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    # full fine-tuning at a learning rate high enough that the eval loss jumps about (best: step 6 of 8 here)
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "full", "--do_eval", "--val_size", "4",
                              "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
                              "--save_steps", "2", "--max_steps", "8", "--learning_rate", "0.5",
                              "--load_best_model_at_end", "true")))
    state = json.loads((out / "trainer_state.json").read_text())
    during = [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e][:-1]  # not the final
    best_step, best_loss = min(during, key=lambda p: p[1])
    assert best_step < 8 and state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    final = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert final == pytest.approx(best_loss, abs=1e-5) and final != pytest.approx(during[-1][1], abs=1e-3)
