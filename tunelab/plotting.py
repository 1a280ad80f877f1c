"""Loss curve of a run: raw and smoothed training loss (and the eval loss of evaluations during training)
from trainer_state.json's log history.

`--plot_loss` always leaves training_loss.png or one line saying why not: a short run logs often enough for
a curve (`logging_steps_for`), and a run that logged once is drawn as its single point.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tunelab.names import TRAINER_STATE_FILE

logger = logging.getLogger(__name__)

MIN_POINTS = 10  # a loss curve needs about this many logged steps


def logging_steps_for(planned_steps: int, logging_steps: float, points: int = MIN_POINTS) -> int:
    """The logging interval that gives a run of `planned_steps` optimizer steps at least `points` loss points
    (down to logging every step): `logging_steps` where it already does."""
    if logging_steps < 1:  # HF reads a float below 1 as a fraction of the run
        logging_steps = math.ceil(planned_steps * logging_steps)
    return int(max(1, min(logging_steps, planned_steps // points)))


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average; by default heavier smoothing for longer curves (as TensorBoard-like tools)."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)  # 0 for 1 point, -> 0.9 for long runs
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def loss_points(log_history: list[dict], key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the log history: "loss" (training) or "eval_loss" (eval during training).
    For "loss", when none was logged (a run shorter than logging_steps), the run's mean loss at its last step
    (the `train_loss` entry) as the one point."""
    for name in ((key, "train_loss") if key == "loss" else (key,)):
        points = [(int(e["step"]), float(e[name])) for e in log_history if name in e and "step" in e]
        if points:
            return [s for s, _ in points], [v for _, v in points]
    return [], []


def plot_loss(run_dir: str | Path, out_name: str = "training_loss.png") -> Path | None:
    """Write <run_dir>/training_loss.png from <run_dir>/trainer_state.json and return its path; None, after
    a one-line warning saying why, when there is no loss to draw."""
    run_dir = Path(run_dir)
    state_file = run_dir / TRAINER_STATE_FILE
    if not state_file.is_file():
        logger.warning("--plot_loss: no plot, %s is missing", state_file)
        return None
    state = json.loads(state_file.read_text(encoding="utf-8"))
    steps, losses = loss_points(state.get("log_history", []))
    if not steps:
        logger.warning("--plot_loss: no plot, %s logged no training loss (no optimizer step ran)", state_file)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    marker = "o" if len(steps) < 2 * MIN_POINTS else None  # a few points (or one) stay visible
    ax.plot(steps, losses, color="#1f77b4", alpha=0.4, label="raw", marker=marker)
    ax.plot(steps, smooth(losses), color="#1f77b4", label="smoothed")
    eval_steps, eval_losses = loss_points(state.get("log_history", []), "eval_loss")
    if eval_steps:  # --do_train --do_eval: eval loss at each evaluation
        ax.plot(eval_steps, eval_losses, "o-", color="#d62728", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss of {run_dir.name}")
    ax.legend()
    out = run_dir / out_name
    fig.savefig(out, format="png", bbox_inches="tight")
    plt.close(fig)
    return out
