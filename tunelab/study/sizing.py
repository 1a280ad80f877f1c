"""`tunelab study SPEC --budget 30m`: fit the study's sizes to a time budget on this machine, or reuse the
sizes a study dir recorded. Edges only: the arithmetic (knobs, floors, the time estimate, the bisection)
is tunelab/study/budget.py; the measurements (model shape on the meta device, token counts of the data,
the matmul peak) are tunelab/study/calibrate.py's.

A study sized by a budget records {seconds, factor, estimated_seconds, peak_gflops, precision, sizes}
under "budget" in plan.json. Resuming it (`tunelab study STUDY_DIR`, or the same command again) reuses
those sizes exactly and never re-fits: on a busier machine a new fit would pick other sizes, and the
finished rows would no longer belong to the study.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.study.budget import (EXPECTED_MFU, STAGE_OVERHEAD_S, Estimate, describe, describe_sizes,
                                  duration_label, expected_mfu, fit, floor_factor, parse_duration, row_seconds, shrink,
                                  sizes, with_sizes)


def resolve(budget_text: str | None, spec, scale: str | None, study_dir: Path, plan: dict[str, Any],
            row_ids: list[int] | None = None, devices: int = 1, executor: str = "local",
            log: Callable[[str], None] = print) -> tuple[Any, str | None, dict[str, Any] | None]:
    """(spec to expand, scale to expand it at, plan.json "budget" record or None). `plan`: the study dir's
    plan.json as read ({} for a new study). Without --budget and without a record: the spec unchanged."""
    recorded = plan.get("budget")
    if budget_text is None and not recorded:
        return spec, scale, None
    seconds = parse_duration(budget_text) if budget_text is not None else None
    settled = replace(_apply_scale(spec, scale), scales={}, default_scale=None)  # expand applies nothing more
    if recorded:
        _check_same(recorded, seconds, study_dir)
        log(f"budget: the sizes --budget {duration_label(recorded['seconds'])} chose when this study started "
            f"(plan.json; not re-fitted, so finished rows stay valid): {describe_sizes(recorded['sizes'])}")
        return with_sizes(settled, recorded["sizes"]), None, recorded
    if plan:
        raise TunelabError(f"{study_dir} was started without --budget (scale {plan.get('scale') or '-'}): resume "
                           f"it without --budget, or give --output_dir for a new study sized by --budget")
    if executor != "local":
        raise TunelabError(f"--budget sizes the study for this machine, but --executor {executor} runs the rows "
                           f"elsewhere: pick the sizes with --scale (or --set max_samples=...) instead")
    record = fit_sizes(settled, seconds, study_dir, row_ids, devices, log)
    log(describe(record, scale))
    return with_sizes(settled, record["sizes"]), None, record


def _apply_scale(spec, scale: str | None):
    from tunelab.study.spec import apply_scale

    return apply_scale(spec, scale)


def _check_same(recorded: dict[str, Any], seconds: int | None, study_dir: Path) -> None:
    if seconds is not None and seconds != recorded["seconds"]:
        raise TunelabError(
            f"{study_dir} was sized by --budget {duration_label(recorded['seconds'])} "
            f"({describe_sizes(recorded['sizes'])}) and keeps those sizes: resume it without --budget, or give "
            f"--output_dir for a new study sized by --budget {duration_label(seconds)}")


def fit_sizes(settled, seconds: int, study_dir: Path, row_ids: list[int] | None, devices: int,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Measure this machine and fit the sizes of `settled` (a spec with its scale applied) to `seconds`."""
    from tunelab.study import calibrate

    log(f"budget: planning the grid on this machine for --budget {duration_label(seconds)} "
        f"(model shape, token counts at a few sizes, matmul peak) ...")
    cfg = {**settled.shared, **settled.train}
    shape, tokenizer = calibrate.model_shape(cfg.get("model_name_or_path"))
    precision = calibrate.study_precision(cfg)
    peak = calibrate.measure_peak(precision)
    mfu = expected_mfu(precision)
    planner = Planner(settled, study_dir, row_ids, devices, shape, tokenizer, peak, mfu)
    factor, estimate = fit(planner, seconds, floor_factor(planner.full))
    return {"seconds": seconds, "factor": round(factor, 4), "estimated_seconds": round(estimate.seconds, 1),
            "peak_gflops": peak, "precision": precision, "devices": devices,
            "expected_mfu": mfu, "stage_overhead_s": STAGE_OVERHEAD_S, "sizes": shrink(planner.full, factor)}


class Planner:
    """factor -> Estimate of the rows to run: the grid expanded at the shrunk sizes and planned from its
    tokenized data. Sizes seen before (rounding maps nearby factors to the same sizes) are not replanned,
    and token counts are shared across sizes (calibrate.plan_rows's cache)."""

    def __init__(self, settled, study_dir: Path, row_ids: list[int] | None, devices: int, shape, tokenizer,
                 peak_gflops: float, mfu: float = EXPECTED_MFU):
        self.settled, self.study_dir, self.row_ids, self.devices = settled, study_dir, row_ids, devices
        self.shape, self.tokenizer, self.peak_gflops, self.mfu = shape, tokenizer, peak_gflops, mfu
        self.full = sizes(settled)
        self.estimates: dict[str, Estimate] = {}
        self.tokens: dict[str, Any] = {}

    def __call__(self, factor: float) -> Estimate:
        chosen = shrink(self.full, factor)
        key = json.dumps(chosen, sort_keys=True)
        if key not in self.estimates:
            self.estimates[key] = self.estimate(chosen)
        return self.estimates[key]

    def estimate(self, chosen: dict[str, Any]) -> Estimate:
        from tunelab.study.calibrate import plan_rows
        from tunelab.study.spec import expand, select_rows

        plans = expand(with_sizes(self.settled, chosen), None, self.study_dir)
        plans = select_rows(plans, self.row_ids) if self.row_ids else plans
        planned = plan_rows(plans, self.shape, self.tokenizer, cache=self.tokens)
        return Estimate({p.dir: row_seconds(planned[p.dir]["flops"], stage_calls(p), self.peak_gflops, self.mfu)
                         for p in plans}, self.devices)


def stage_calls(plan) -> int:
    """The stage calls that run a row, each with its own model load: training, then its eval sets together
    (the runner's run_evals: one model, one generation)."""
    return (1 if plan.train else 0) + (1 if plan.evals else 0)
