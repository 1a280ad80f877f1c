"""The study's progress view (study.log and the terminal) and its session bookkeeping (efficiency.json).

At the start of a session, after the calibration (tunelab/study/calibrate.py), one line says what the
study will cost on this machine before any row has run:

    planned ≈ 41.3 TFLOP; this machine's peak 212 GFLOP/s (bf16); ETA ≈ 8 min (at an assumed 40% MFU)

(the MFU --budget plans with, per precision: efficiency.expected_mfu); an ETA over 30 minutes for a study
not sized by --budget names that option. Then one line per finished row: status, time, headline scores,
the row's time split (train / scoring / generation), the study's MFU so far, elapsed and ETA. The ETA takes
each part of the rows left at the rate the finished rows did that part (tunelab/study/efficiency.py Budget);
without a calibration it is the mean row time times the rows left.

efficiency.json holds the latest calibration and every session's duration, so the report's MFU uses
the wall time the study really took, over however many sessions (resumes) it ran.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.names import PLAN_FILE
from tunelab.study.efficiency import EFFICIENCY_FILE, MODEL_PARTS, Budget, ModelShape, row_flops, row_split
from tunelab.study.files import read_json_object

logger = logging.getLogger(__name__)


def _read(study_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((study_dir / EFFICIENCY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(study_dir: Path, data: dict[str, Any]) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    tmp = study_dir / (EFFICIENCY_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, study_dir / EFFICIENCY_FILE)


def budget_from(calibration: dict[str, Any]) -> Budget | None:
    """The ETA's budget from a calibration record; None when it lacks the peak or the planned rows."""
    if not calibration.get("peak_gflops") or not calibration.get("rows"):
        return None
    planned = {d: {part: float(flops) for part, flops in (r.get("flops") or {}).items() if part in MODEL_PARTS}
               for d, r in calibration["rows"].items()}
    return Budget(planned, calibration["peak_gflops"], calibration.get("precision", "?"),
                  int(calibration.get("devices") or 1))


def start_session(study_dir: Path, plans, todo, calibrate: Callable | None, devices: int,
                  log: Callable[[str], None]) -> Budget | None:
    """Calibrate (when asked), record it in efficiency.json, print the planned cost; the ETA's budget."""
    data = _read(study_dir)
    if calibrate is not None:
        data["calibration"] = calibrate(plans, devices)
        _write(study_dir, data)
    calibration = data.get("calibration") or {}
    budget = budget_from(calibration) if calibrate is not None else None
    if budget is not None:
        sized = bool(read_json_object(study_dir / PLAN_FILE).get("budget"))  # sized by --budget (plan.json)
        log(budget.start_line([p.dir for p in todo], sized))
    elif calibrate is not None:
        log(f"calibration incomplete ({'; '.join(calibration.get('errors', [])) or 'no planned rows'}): "
            "the ETA comes from row times")
    return budget


def end_session(study_dir: Path, progress: Progress, measure_peak: Callable[[str], float] | None = None) -> None:
    """Append this session's wall time to efficiency.json (also after Ctrl-C: that time was spent), and with
    `measure_peak(precision)` the matmul peak measured again now (`peak_gflops_end`: the report's MFU takes the
    highest measure, as a slow moment of a shared host at the start would flatter it)."""
    if progress.total == 0:
        return
    data = _read(study_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(progress.start))
    session = {"started": started, "seconds": round(time.time() - progress.start, 1), "rows": progress.done}
    precision = (data.get("calibration") or {}).get("precision")
    if measure_peak is not None and precision:
        try:
            session["peak_gflops_end"] = round(measure_peak(precision), 1)
        except Exception as err:  # a figure for the report: never fail the study for it
            logger.warning("peak not measured again at the end: %s: %s", type(err).__name__, err)
    data.setdefault("sessions", []).append(session)
    _write(study_dir, data)


class Progress:
    """One line per finished row: status, time, headline scores, time split, MFU, elapsed and ETA."""

    def __init__(self, todo: list, workers: int, log: Callable[[str], None], budget: Budget | None = None,
                 study_dir: Path | None = None):
        self.total, self.workers, self.log, self.budget = len(todo), max(workers, 1), log, budget
        self.todo = [p.dir for p in todo]
        self.study_dir = study_dir
        self.done, self.durations, self.start, self.flops = 0, [], time.time(), 0.0

    def update(self, plan, record: dict[str, Any]) -> None:
        self.done += 1
        if record.get("seconds") is not None and not record.get("skipped"):
            self.durations.append(record["seconds"])
        elapsed = time.time() - self.start
        status = record.get("status", "?")
        detail = headline(record) if status == "done" else (record.get("error") or "")[:160]
        split = row_split(self.study_dir / plan.dir, record) if self.study_dir is not None and status == "done" else {}
        self.log(f"[{self.done:>2}/{self.total}] {plan.dir.split('/')[-1]:<34} {status:<6} "
                 f"{fmt_time(record.get('seconds', 0))}  {detail}{self._efficiency(plan, record, split, elapsed)}"
                 f"  | elapsed {fmt_time(elapsed)}, ETA {fmt_time(self._eta(plan, split, elapsed))}")

    def _eta(self, plan, split: dict[str, float], elapsed: float) -> float:
        if self.budget is not None:
            self.budget.finished(plan.dir, split)
            return self.budget.eta(self.todo, elapsed)[0]
        left = self.total - self.done
        return (sum(self.durations) / len(self.durations)) * left / self.workers if self.durations else 0.0

    def _efficiency(self, plan, record: dict[str, Any], split: dict[str, float], elapsed: float) -> str:
        """' (train 1m02s, scoring 20s, generation 41s; study MFU 38%)' where the files tell (`split`: the row's
        seconds per part, row_split; empty when they do not)."""
        if not split:
            return ""
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt_time(v)}" for k, v in split.items() if v >= 0.5)
        calibration = _read(self.study_dir).get("calibration") or {}
        if self.budget is not None and calibration.get("model"):
            planned = (calibration.get("rows") or {}).get(plan.dir, {})
            self.flops += row_flops(self.study_dir / plan.dir, record, ModelShape.from_dict(calibration["model"]),
                                    planned) or 0.0
            parts += f"; study MFU {self.flops / max(elapsed * self.budget.peak_flops, 1e-9):.0%}"
        return f" ({parts})" if parts else ""


def headline(record: dict[str, Any]) -> str:
    parts = []
    for stage, info in record.get("stages", {}).items():
        metrics = info.get("metrics") or {}
        if stage == "train" and "train_loss" in metrics:
            parts.append(f"loss {metrics['train_loss']:.3f}")
        elif "predict_bleu-4" in metrics:
            parts.append(f"{stage} bleu-4 {metrics['predict_bleu-4']:.2f}")
    return ", ".join(parts)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds or 0)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
