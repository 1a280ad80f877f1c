"""Experiment tracking (--report_to): nothing is sent anywhere by default; tensorboard writes event files that
tensorboard's own reader reads back; a tracker whose package is missing fails in one line before anything
loads; a study names each row's run after the row."""

from __future__ import annotations

import importlib.util

import pytest
from test_study_fakes import tiny_spec_dict
from test_train import train_argv

from tunelab.hparams import TunelabError, parse_args
from tunelab.study.spec import expand, parse_spec
from tunelab.train import run


def _parse(*flags: str):
    return parse_args(["--do_train", "--output_dir", "unused", *flags])


def test_default_reports_nowhere():
    assert _parse().training.report_to == []


def test_a_comma_list_or_yaml_list_becomes_hf_s_list():
    assert _parse("--report_to", "tensorboard").training.report_to == ["tensorboard"]
    args = parse_args(config={"do_train": True, "output_dir": "x", "report_to": ["tensorboard"]})
    assert args.training.report_to == ["tensorboard"]


def test_unknown_tracker_names_the_closest():
    with pytest.raises(TunelabError, match="unknown --report_to 'tensorbord': did you mean tensorboard"):
        _parse("--report_to", "tensorbord")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_fails_in_one_line_before_loading(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TunelabError, match=r"^--report_to wandb: the wandb package is not installed: pip install "
                                           r"wandb, or --report_to none$"):
        run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--report_to", "wandb")))
    assert not out.exists()


def test_tensorboard_events_read_back(tiny_llama_dir, tiny_data_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(parse_args(train_argv(tiny_llama_dir, tiny_data_dir, out, "lora", "--max_steps", "4", "--report_to",
                              "tensorboard")))
    events = sorted((out / "runs").rglob("events.out.tfevents.*"))  # HF's place: <output_dir>/runs/<date_host>
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4] and all(v > 0 for v in losses)


def test_a_study_names_each_reporting_row_after_itself():
    spec = tiny_spec_dict()
    spec["shared"]["report_to"] = "tensorboard"
    plans = expand(parse_spec(spec), None, "/tmp/st")
    assert [p.train["run_name"] for p in plans[1:]] == [p.dir.split("/")[-1] for p in plans[1:]]
    assert all(p.train["report_to"] == "tensorboard" for p in plans[1:])
    quiet = expand(parse_spec(tiny_spec_dict()), None, "/tmp/st")
    assert all("run_name" not in p.train for p in quiet[1:])  # fingerprints of studies without trackers unchanged
