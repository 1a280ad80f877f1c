"""--eval_likelihood: the study's per-sample likelihood measures (tunelab/likelihood.py) as eval metrics during
training — in log_history at every evaluation, equal to what `tunelab eval` measures on the saved model, KL 0
before any step, usable by --metric_for_best_model / early stopping (lower is better); bad input fails before
anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import train_argv

from tunelab.eval_likelihood import summarize
from tunelab.hparams import TunelabError, parse_args
from tunelab.likelihood import Scores
from tunelab.setup import training_args
from tunelab.train import run
from tunelab.validate import measure_of, parse_measures

KEYS = ("eval_nll", "eval_nll_sample_mean", "eval_kl", "eval_kl_sample_mean", "eval_kl_topk_mass")


@pytest.mark.parametrize("value, measures", [(None, ()), ("", ()), ("nll", ("nll",)), (" kl , nll,kl", ("kl", "nll"))])
def test_parse_measures(value, measures):
    assert parse_measures(value) == measures


@pytest.mark.parametrize("metric, measure", [("nll", "nll"), ("eval_kl", "kl"), ("eval_kl_sample_mean", "kl"),
                                             ("loss", None), ("eval_loss", None), ("nllx", None), (None, None)])
def test_measure_of_a_metric_name(metric, measure):
    assert measure_of(metric) == measure


def test_summarize_token_and_sample_means():
    # three samples: 2 tokens (nll 2.0, kl 0.2), none, 3 tokens (nll 1.5, kl 0.9); hand-computed means
    scores = Scores(torch.tensor([2, 0, 3]), torch.tensor([2.0, 0.0, 1.5], dtype=torch.float64),
                    torch.tensor([0.2, 0.0, 0.9], dtype=torch.float64))
    out = summarize(scores, ("nll", "kl"), covered_mass=0.987654321)
    assert out == pytest.approx({"nll": 3.5 / 5, "nll_sample_mean": (1.0 + 0.5) / 2, "kl": 1.1 / 5,
                                 "kl_sample_mean": (0.1 + 0.3) / 2, "kl_topk_mass": 0.987654})
    assert set(summarize(scores, ("nll",))) == {"nll", "nll_sample_mean"}


@pytest.mark.parametrize("flags, message", [
    (["--do_eval", "--val_size", "4", "--eval_likelihood", "nll,kll"], "unknown --eval_likelihood measure 'kll'"),
    (["--eval_likelihood", "nll"], "give it with --do_train --do_eval"),  # no evaluations during training
    (["--do_eval", "--val_size", "4", "--eval_likelihood", "nll", "--metric_for_best_model", "eval_kl"],
     "measured only with --eval_likelihood nll,kl"),
    (["--do_eval", "--val_size", "4", "--metric_for_best_model", "nll"], "measured only with --eval_likelihood nll"),
])
def test_bad_eval_likelihood_options_fail_in_one_line_before_loading(flags, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match=message) as err:
        parse_args(["--do_train", "--output_dir", str(out), *flags])  # parsing loads no model
    assert "\n" not in str(err.value) and not out.exists()


def test_eval_stage_refuses_the_option():
    with pytest.raises(TunelabError, match="tunelab eval scores nll and kl always"):
        parse_args(["--do_eval", "--output_dir", "unused", "--eval_likelihood", "kl"])


@pytest.mark.parametrize("flags, greater", [(["--metric_for_best_model", "kl"], False),
                                            (["--metric_for_best_model", "eval_nll_sample_mean"], False),
                                            (["--metric_for_best_model", "kl", "--greater_is_better", "true"], True),
                                            (["--metric_for_best_model", "loss"], False)])
def test_likelihood_measures_are_lower_is_better_unless_told(flags, greater):
    args = parse_args(["--do_train", "--do_eval", "--val_size", "4", "--output_dir", "unused",
                       "--eval_likelihood", "nll,kl", *flags])
    assert training_args(args).greater_is_better is greater


def _evals(out) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "eval_loss" in e]


def test_measures_at_every_evaluation_match_tunelab_eval(tiny_llama_dir, tiny_data_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--do_eval", "--eval_dataset", "tiny",
                              "--max_samples", "8", "--eval_strategy", "steps", "--eval_steps", "2",
                              "--max_steps", "4", "--eval_on_start", "true", "--eval_likelihood", "nll,kl",
                              "--report_to", "tensorboard")))
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 2, 4, 4]  # at the start, every 2 steps, and the final evaluation
    assert all(all(key in e for key in KEYS) for e in evals), evals
    # logged before the callbacks ran: the tracker has them too
    for name in ("kl", "nll_sample_mean"):
        assert _tensorboard(out, f"eval/{name}") == [(e["step"], pytest.approx(e[f"eval_{name}"])) for e in evals]
    start, *_, final = evals
    assert start["eval_kl"] == 0 and start["eval_kl_sample_mean"] == 0  # LoRA starts as the base (B = 0)
    assert final["eval_kl"] > 1e-4 and final["eval_nll"] < start["eval_nll"]  # it trained away from the base
    # the same model and rows scored by `tunelab eval` (likelihood.py, base log-probs from the base model)
    scored = run(parse_args(["--do_eval", "--checkpoint_dir", str(out), "--dataset", "tiny", "--dataset_dir",
                             str(tiny_data_dir), "--max_samples", "8", "--output_dir", str(tmp_path / "eval"),
                             "--bf16", "false"]))
    assert final["eval_nll"] == pytest.approx(scored["eval_nll"], abs=1e-5)
    assert final["eval_kl"] == pytest.approx(scored["eval_kl"], abs=1e-5)
    assert start["eval_nll"] == pytest.approx(_base_nll(tiny_llama_dir, tiny_data_dir, tmp_path), abs=1e-5)
    per_sample = [json.loads(line)["nll"] for line in (tmp_path / "eval" / "likelihood.jsonl").open()]
    assert final["eval_nll_sample_mean"] == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-5)


def _tensorboard(out, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _base_nll(model_dir, data_dir, tmp_path) -> float:
    return run(parse_args(["--do_eval", "--finetuning_type", "none", "--model_name_or_path", str(model_dir),
                           "--dataset", "tiny", "--dataset_dir", str(data_dir), "--max_samples", "8",
                           "--template", "auto", "--output_dir", str(tmp_path / "base_eval"), "--bf16", "false"]
                          ))["eval_nll"]


def _early_stopping_run(model_dir, data_dir, out, learning_rate: str) -> dict:
    # eval rows = the 8 training rows, so that eval_nll falls with the training loss
    run(parse_args(train_argv(model_dir, data_dir, out, "lora", "--do_eval", "--eval_dataset", "tiny", "--max_samples",
                              "8", "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "8",
                              "--learning_rate", learning_rate,
                              "--eval_likelihood", "nll", "--metric_for_best_model", "nll",
                              "--early_stopping_patience", "1")))
    return json.loads((out / "trainer_state.json").read_text())


def test_early_stopping_on_eval_nll(tiny_llama_dir, tiny_data_dir, tmp_path):
    # learning rate 0: eval_nll never improves, so patience 1 stops at the second evaluation (step 4 of 8)
    assert _early_stopping_run(tiny_llama_dir, tiny_data_dir, tmp_path / "flat", "0")["global_step"] == 4
    # a learning rate at which eval_nll falls at every evaluation: lower is better, so it never stops early
    state = _early_stopping_run(tiny_llama_dir, tiny_data_dir, tmp_path / "falls", "2e-2")
    nll = [e["eval_nll"] for e in state["log_history"] if "eval_nll" in e]
    assert state["global_step"] == 8 and nll[:4] == sorted(nll[:4], reverse=True), nll
    assert state["best_metric"] == pytest.approx(min(nll[:4]))
