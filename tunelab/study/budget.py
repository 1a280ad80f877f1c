"""Sizing a study to a time budget (`tunelab study SPEC --budget 30m`): the scale's sample counts are
multiplied by one factor, the largest that makes the grid's estimated time fit. Pure: the estimate's
inputs (each row's planned FLOPs from the tokenized data, the machine's matmul peak) are measured in
tunelab/study/sizing.py, which also records the choice in plan.json.

The knobs, each the effective value a stage sees (eval set > eval > shared; train > shared):
    train      train max_samples: rows taken from each training data set (so it caps the aux set too)
    eval       each eval set's max_samples: samples scored per set
    generate   each eval set's max_generate_samples: samples generated (and BLEU/ROUGE-scored) per set
Each becomes round(size x factor), never below its floor (FLOORS: fewer samples resolve no difference)
and never above the scale's own size. A knob the scale leaves unset (all rows) stays unset: give the
scale a max_samples for --budget to shrink it.

A row's time = its planned model FLOPs / (peak x the precision's expected MFU, efficiency.expected_mfu)
+ STAGE_OVERHEAD_S per stage call (training, and the eval sets together: sizing.stage_calls); the grid's time is
the rows' sum over the devices that run them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tunelab.errors import TunelabError
from tunelab.study.efficiency import EXPECTED_MFU, expected_mfu

FLOORS = {"train": 16, "eval": 16, "generate": 4}
STAGE_OVERHEAD_S = 2.0
FIT_STEPS = 6  # bisection steps after the two ends: the factor to within (1 - floor) / 64
DURATION_FORMS = "30m, 45min, 1h, 1h30m or 90s"
_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)(?:min|m))?(?:(?P<s>\d+)s)?$")


# ---- durations ----

def parse_duration(text: str) -> int:
    """'30m' / '45min' / '1h' / '1h30m' / '90s' -> seconds; anything else is refused in one line."""
    match = _DURATION.match(str(text).strip().lower().replace(" ", ""))
    if not match or not any(match.groupdict().values()):
        raise TunelabError(f"--budget expects a duration such as {DURATION_FORMS}, got '{text}'")
    h, m, s = (int(match[k] or 0) for k in "hms")
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise TunelabError(f"--budget must be longer than zero (e.g. {DURATION_FORMS}), got '{text}'")
    return seconds


def duration_label(seconds: float) -> str:
    """Compact form for names: 1800 -> '30m', 5400 -> '1h30m', 90 -> '1m30s'."""
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def format_duration(seconds: float) -> str:
    """For people: '45 s', '28 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# ---- the size knobs of a spec ----

def sizes(spec) -> dict[str, Any]:
    """{"train": n, "eval": {set: n}, "generate": {set: n}} as the stages will see them (None = all rows)."""
    def effective(key: str, *layers: dict[str, Any]) -> int | None:
        return next((layer[key] for layer in layers if key in layer), None)

    return {"train": effective("max_samples", spec.train, spec.shared),
            "eval": {name: effective("max_samples", cfg, spec.eval, spec.shared)
                     for name, cfg in spec.eval_sets.items()},
            "generate": {name: effective("max_generate_samples", cfg, spec.eval, spec.shared)
                         for name, cfg in spec.eval_sets.items()}}


def with_sizes(spec, chosen: dict[str, Any]):
    """The spec with these sizes written where each stage reads them (train, each eval set)."""
    unknown = sorted(set(chosen["eval"]) - set(spec.eval_sets))
    if unknown:
        raise TunelabError(f"recorded sizes name eval sets the spec does not have: {', '.join(unknown)} "
                           f"(its sets: {', '.join(spec.eval_sets)})")
    train = dict(spec.train)
    if chosen["train"] is not None:
        train["max_samples"] = chosen["train"]
    sets = {}
    for name, cfg in spec.eval_sets.items():
        cfg = dict(cfg)
        for key, knob in (("max_samples", "eval"), ("max_generate_samples", "generate")):
            if chosen[knob].get(name) is not None:
                cfg[key] = chosen[knob][name]
        sets[name] = cfg
    return replace(spec, train=train, eval_sets=sets)


def shrink(full: dict[str, Any], factor: float) -> dict[str, Any]:
    """Every knob x factor, rounded, kept within [its floor, its size]."""
    def one(value: int | None, knob: str) -> int | None:
        return None if value is None else min(value, max(FLOORS[knob], round(value * factor)))

    return {"train": one(full["train"], "train"),
            "eval": {k: one(v, "eval") for k, v in full["eval"].items()},
            "generate": {k: one(v, "generate") for k, v in full["generate"].items()}}


def scaled(spec, factor: float):
    """The spec (a scale already applied) with its size knobs multiplied by `factor` (module docstring)."""
    return with_sizes(spec, shrink(sizes(spec), factor))


def floor_factor(full: dict[str, Any]) -> float:
    """The factor at and below which every knob sits at its floor (1.0 when none can shrink)."""
    ratios = [FLOORS[knob] / v for knob, v in _knobs(full) if v is not None and v > FLOORS[knob]]
    return min(ratios, default=1.0)


def _knobs(full: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [("train", full["train"]), *(("eval", v) for v in full["eval"].values()),
            *(("generate", v) for v in full["generate"].values())]


# ---- the estimate and the fit ----

@dataclass(frozen=True)
class Estimate:
    """Estimated seconds of each row (row dir -> s) and of the grid on `devices` devices."""

    rows: dict[str, float]
    devices: int = 1

    @property
    def seconds(self) -> float:
        return sum(self.rows.values()) / max(self.devices, 1)

    def longest(self) -> tuple[str, float]:
        return max(self.rows.items(), key=lambda item: item[1], default=("-", 0.0))


def row_seconds(flops: dict[str, float], stages: int, peak_gflops: float, mfu: float = EXPECTED_MFU) -> float:
    """A row's estimated time from its planned FLOPs ({train, scoring, generation}) and its stage count."""
    return sum(flops.values()) / (peak_gflops * 1e9 * mfu) + stages * STAGE_OVERHEAD_S


def fit(estimate: Callable[[float], Estimate], budget_seconds: float, lowest: float) -> tuple[float, Estimate]:
    """(the largest factor in [lowest, 1] whose estimate fits the budget, its estimate), by bisection:
    1.0 when the sizes fit as they are; a TunelabError naming one row's time when even `lowest` does not."""
    top = estimate(1.0)
    if top.seconds <= budget_seconds:
        return 1.0, top
    low = estimate(lowest)
    if low.seconds > budget_seconds:
        raise TunelabError(too_small(budget_seconds, low))
    lo, hi = lowest, 1.0
    for _ in range(FIT_STEPS):
        mid = (lo + hi) / 2
        guess = estimate(mid)
        if guess.seconds <= budget_seconds:
            lo, low = mid, guess
        else:
            hi = mid
    return lo, low


def too_small(budget_seconds: float, at_floor: Estimate) -> str:
    """Why a budget cannot fit even the smallest sizes, with what this machine needs."""
    row, seconds = at_floor.longest()
    return (f"--budget {duration_label(budget_seconds)} is too short for this study on this machine: at the "
            f"smallest sizes ({FLOORS['train']} training samples per data set, {FLOORS['eval']} eval samples "
            f"per set) one row needs up to {format_duration(seconds)} ({row}) and the {len(at_floor.rows)} "
            f"rows {format_duration(at_floor.seconds)}: give a larger --budget, or run part of the grid "
            f"with --rows")


# ---- what the report says ----

def describe_sizes(chosen: dict[str, Any]) -> str:
    """'train 27 samples per data set, eval persona 20 / general 40 samples, 7 generated per set'."""
    evals = " / ".join(f"{k} {_count(v)}" for k, v in chosen["eval"].items())
    generate = chosen["generate"]
    if len(set(generate.values())) == 1:
        generated = f"{_count(next(iter(generate.values())))} generated per set"
    else:
        generated = "generated " + " / ".join(f"{k} {_count(v)}" for k, v in generate.items())
    return f"train {_count(chosen['train'])} samples per data set, eval {evals} samples, {generated}"


def _count(value: int | None) -> str:
    return "all" if value is None else str(value)


def describe(record: dict[str, Any], scale: str | None) -> str:
    """The scale description of a budgeted study (plan.json "scale_description", the report's intro)."""
    base = f"the {scale} scale" if scale else "the spec"
    factor = f"{base} as it is" if record["factor"] >= 1.0 else f"{record['factor']:.2f} x {base}"
    return (f"Sized by --budget {duration_label(record['seconds'])} on this machine ({record['precision']} peak "
            f"{_gflops(record['peak_gflops'])} GFLOP/s, an expected {record.get('expected_mfu', EXPECTED_MFU):.0%} MFU): "
            f"{factor}: "
            f"{describe_sizes(record['sizes'])}; estimated {format_duration(record['estimated_seconds'])}.")


def _gflops(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"
