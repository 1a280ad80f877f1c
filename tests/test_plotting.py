"""--plot_loss: a short run logs often enough for a curve, a single logged loss is drawn, and no loss at all is
said in one line instead of a silently missing png."""

import json
import logging

import pytest

from tunelab.hparams import parse_args
from tunelab.plotting import logging_steps_for, loss_points, plot_loss
from tunelab.train import run


@pytest.mark.parametrize("planned, logging_steps, expected", [
    (2, 500, 1),       # a 2-step run logs every step
    (40, 500, 4),      # >= 10 points
    (10_000, 500, 500),  # a long run keeps the interval asked for
    (100, 0.5, 10),    # HF's fraction-of-the-run form, made >= 10 points too
    (0, 500, 1),
])
def test_logging_steps_for(planned, logging_steps, expected):
    assert logging_steps_for(planned, logging_steps) == expected


def test_loss_points_fall_back_to_the_runs_mean_loss():
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"train_loss": 1.75, "step": 2}]
    assert loss_points(history) == ([1, 2], [2.0, 1.5])
    assert loss_points([{"train_loss": 1.75, "step": 3}]) == ([3], [1.75])
    assert loss_points([{"eval_loss": 1.0, "step": 3}]) == ([], [])


def _state(run_dir, history):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_a_single_point_is_plotted(tmp_path):
    _state(tmp_path / "run", [{"train_loss": 1.75, "step": 1}])
    out = plot_loss(tmp_path / "run")
    assert out == tmp_path / "run" / "training_loss.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_no_loss_says_why_in_one_line(tmp_path, caplog):
    _state(tmp_path / "run", [{"eval_loss": 1.0, "step": 0}])
    with caplog.at_level(logging.WARNING, logger="tunelab.plotting"):
        assert plot_loss(tmp_path / "run") is None
        assert plot_loss(tmp_path / "missing") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "no training loss" in lines[0] and "missing" in lines[1]
    assert all("\n" not in line and line.startswith("--plot_loss: no plot") for line in lines)


def test_a_two_step_run_writes_its_plot_with_a_point_per_step(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    run(parse_args(["--do_train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny", "--dataset_dir",
                    str(tiny_data_dir), "--output_dir", str(out), "--max_steps", "2", "--bf16", "false",
                    "--per_device_train_batch_size", "4", "--plot_loss"]))  # HF's default logging_steps: 500
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert (out / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
