"""Resume tells the truth: which checkpoint a run continues from, what an older run leaves behind, and a
train_loss that covers the whole run however many times it was stopped and resumed.

    resume = resolve_resume(args)                 # --resume_from_checkpoint true|PATH -> a whole checkpoint
    clear_old_checkpoints(out, keep)              # --overwrite_output_dir: the older run's checkpoint-* go
    trainer.add_callback(Bookkeeping(earlier_runtime(resume)))   # log at every save and at the end; stop on a
                                                                  # signal; each checkpoint records the run time
    metrics = whole_run_metrics(result.metrics, trainer.state, resume)   # train_loss, runtime, rates: whole run

HF's Trainer reports train_loss as the mean over the steps of the current `train()` call only, so a run
killed at step 13 of 40 and resumed reported the mean of steps 14-40. The log history in trainer_state.json
travels with every checkpoint; with a log entry at every save and at the last step it covers every step
once, and the step-weighted mean of its losses is the whole run's mean, the same for a resumed run as for
one that was never stopped (its steps' losses are the same, resume being exact).

HF's train_runtime and its samples/steps per second cover the current `train()` call too. Each checkpoint
records the training time up to it (train_runtime.json, written before its completion marker); the resumed
run adds its own, and the rates become the whole run's steps and samples over that time. Time spent after
the last checkpoint of a killed session is not counted: those steps are trained again.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunelab import distributed, integrity, signals
from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

_LATEST = ("true", "auto", "last", "1")
RUNTIME_FILE = "train_runtime.json"


def resolve_resume(resume: Any, output_dir: str | Path) -> str | None:
    """The checkpoint folder to resume from: the newest whole `checkpoint-*` of output_dir for true/auto/last
    (half-saved ones are skipped, and removed), or the folder given, which must be whole."""
    if not resume:
        return None
    out = Path(output_dir)
    if str(resume).lower() in _LATEST:
        folders = integrity.checkpoint_folders(out)
        whole = [p for _, p in folders if integrity.checkpoint_problem(p) is None]
        if not whole:
            broken = f" ({len(folders)} not saved to the end)" if folders else ""
            raise TunelabError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {out}{broken}")
        for _, path in folders:
            problem = integrity.checkpoint_problem(path)
            if problem and distributed.is_main():
                logger.warning("skipping %s: %s; removing it", path.name, problem)
                shutil.rmtree(path, ignore_errors=True)
        return str(whole[-1])
    path = Path(resume)
    if not path.is_dir():
        raise TunelabError(f"--resume_from_checkpoint: checkpoint folder not found: {resume}")
    problem = integrity.checkpoint_problem(path)
    if problem:
        whole = integrity.complete_checkpoints(path.parent)
        hint = f": the last complete one is {whole[-1][1]}" if whole else ""
        raise TunelabError(f"--resume_from_checkpoint {resume} is incomplete: {problem}{hint}")
    return str(path)


def clear_old_checkpoints(out: Path, keep: list[str]) -> None:
    """--overwrite_output_dir without resume: remove the older run's checkpoint-* folders and run status, so
    a later `--resume_from_checkpoint true` cannot continue that run. Refuses when one of them is a
    --checkpoint_dir of this run."""
    folders = [p for _, p in integrity.checkpoint_folders(out)]
    used = [c for c in keep if any(Path(c).resolve().is_relative_to(p.resolve()) for p in folders)]
    if used:
        raise TunelabError(f"--checkpoint_dir {used[0]} is a checkpoint of the run in {out} that "
                           "--overwrite_output_dir replaces: copy it elsewhere or use another --output_dir")
    if not distributed.is_main():
        return
    if folders:
        logger.warning("--overwrite_output_dir: removing %d checkpoint folders of an earlier run in %s",
                       len(folders), out)
    for path in folders:
        shutil.rmtree(path)
    (out / integrity.STATUS_FILE).unlink(missing_ok=True)


def whole_run_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step the log covers: each logged loss (the mean over the steps since
    the previous log entry) weighted by its number of steps."""
    total, last = 0.0, 0
    for entry in sorted((e for e in log_history if "loss" in e and "step" in e), key=lambda e: e["step"]):
        total += entry["loss"] * (entry["step"] - last)
        last = entry["step"]
    return total / last if last else None


def earlier_runtime(resume: str | None) -> float:
    """Seconds of training up to checkpoint `resume` (its train_runtime.json; 0 without one)."""
    record = integrity.read_json(Path(resume) / RUNTIME_FILE) if resume else None
    value = record.get("train_runtime") if isinstance(record, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def whole_run_metrics(metrics: dict[str, Any], state, resume: str | None) -> dict[str, Any]:
    """HF's train metrics made whole-run: train_loss over every step (whole_run_loss), and after a resume
    the earlier sessions' time added to train_runtime, with samples and steps per second over the whole run
    (HF counts a fixed number of samples per step, so the session's samples per step scale to every step)."""
    out = dict(metrics)
    loss = whole_run_loss(state.log_history)
    if loss is not None:
        out["train_loss"] = loss
    earlier, session = earlier_runtime(resume), metrics.get("train_runtime")
    steps = state.global_step - _step_of(resume)  # the steps this session trained
    if not earlier or not session or steps <= 0:
        return out
    whole = session + earlier
    out["train_runtime"] = round(whole, 4)
    if "train_samples_per_second" in metrics:
        per_step = metrics["train_samples_per_second"] * session / steps
        out["train_samples_per_second"] = round(per_step * state.global_step / whole, 3)
    if "train_steps_per_second" in metrics:
        out["train_steps_per_second"] = round(state.global_step / whole, 3)
    return out


def _step_of(resume: str | None) -> int:
    """The step checkpoint `resume` was saved at (its trainer_state.json, else its folder name; 0 for none)."""
    if not resume:
        return 0
    state = integrity.read_json(Path(resume) / "trainer_state.json")
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else integrity.checkpoint_step(resume) or 0


class Bookkeeping(TrainerCallback):
    """Logs at every checkpoint and at the last step (so the log history covers every step, see the module),
    stops with a checkpoint at the end of the step when a signal arrived (tunelab/signals.py), and writes a
    checkpoint's completion marker once every rank has saved into it, after the training time up to it
    (`earlier`: the time of the sessions before a resume)."""

    def __init__(self, earlier: float = 0.0):
        self.earlier = earlier
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if signals.requested() is not None:
            control.should_training_stop = True
            control.should_save = True
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # other ranks write their RNG states into the same folder
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            runtime = round(self.earlier + time.time() - self.started, 4)
            integrity.write_json(folder / RUNTIME_FILE, {"train_runtime": runtime})
            integrity.mark_complete(folder, state.global_step)
        return control
