"""Loss curve of a run: raw and smoothed training loss (and the eval loss of evaluations during training)
from trainer_state.json's log history."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.names import TRAINER_STATE_FILE


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
    """(steps, values) of `key` in the log history: "loss" (training) or "eval_loss" (eval during training)."""
    steps, losses = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            steps.append(int(entry["step"]))
            losses.append(float(entry[key]))
    return steps, losses


def plot_loss(run_dir: str | Path, out_name: str = "training_loss.png") -> Path | None:
    """Write <run_dir>/training_loss.png from <run_dir>/trainer_state.json; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    state = json.loads((run_dir / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    steps, losses = loss_points(state.get("log_history", []))
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, color="#1f77b4", alpha=0.4, label="raw")
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
