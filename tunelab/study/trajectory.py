"""Trajectories: a row's style gain and retention along training, not only at its end.

With `eval_every: N` in the spec, a row's training stage keeps a checkpoint every N optimizer steps
(spec.py sets save_steps), and after its eval stages the runner scores the cheap measures at each
checkpoint: an eval stage without generation (do_eval, no predict_with_generate), which writes
eval_results.json and likelihood.jsonl (one record per sample: index, tokens, nll, kl) like every eval
stage. The points live in

    rows/<row>/trajectory/<eval set>/step-<N>/      eval_results.json, likelihood.jsonl, run files

The final weights are the row's own eval stages (rows/<row>/<set>/likelihood.jsonl, at the step
trainer_state.json ends on), so a checkpoint saved at the last step is not scored twice; step 0 is the
base row (gain 0, retention 0 by definition). A point whose eval_results.json exists is never redone;
a retrained row rescores all of its points.

Reading (pure over files): per point, style gain and retention in the spec's `decide_on` measures,
each the mean over samples of the per-sample paired difference from the base row on the same samples:
    nll: base nll - row nll (style set: > 0 = persona replies became more likely; retention set:
         < 0 = general references became less likely)
    kl:  retention = -mean KL(base || row) on the retention set; style = +mean KL on the style set
BLEU/ROUGE needs generation, which trajectory points skip: a `bleu_rouge` measure is drawn in nll.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.names import LIKELIHOOD_FILE
from tunelab.study.files import read_json_object, read_jsonl

TRAJECTORY_DIR = "trajectory"
POINT_RESULTS = "eval_results.json"
TRAJECTORY_MEASURES = ("nll", "kl")  # what a point without generation can measure
DEFAULT_DECIDE_ON = {"style": "nll", "retention": "nll"}


# ---- running the points (called by runner._run_stages) ----

def checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-<step>` folder, by step."""
    if not train_dir.is_dir():
        return []
    found = [(int(p.name.split("-")[1]), p) for p in train_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found)


def final_step(train_dir: Path) -> int | None:
    """The optimizer step the finished training ended on (trainer_state.json's global_step)."""
    state = read_json_object(train_dir / "trainer_state.json")
    step = state.get("global_step")
    if isinstance(step, int):
        return step
    steps = [e["step"] for e in state.get("log_history", []) if isinstance(e.get("step"), int)]
    return max(steps) if steps else None


def point_dir(row_dir: Path, eval_set: str, step: int) -> Path:
    return row_dir / TRAJECTORY_DIR / eval_set / f"step-{step}"


def point_config(eval_cfg: dict[str, Any], checkpoint: Path, out: Path) -> dict[str, Any]:
    """A row's eval-set options turned into a likelihood-only eval of one checkpoint."""
    return {**eval_cfg, "do_predict": False, "do_eval": True, "predict_with_generate": False,
            "checkpoint_dir": str(checkpoint), "output_dir": str(out)}


def planned_points(evals: dict[str, dict[str, Any]], row_dir: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(eval set, step, options) of every trajectory point of a trained row: each checkpoint before the
    final step, for each eval set (the final weights are the row's own eval stages)."""
    train_dir = row_dir / "train"
    last = final_step(train_dir)
    return [(name, step, point_config(cfg, ckpt, point_dir(row_dir, name, step)))
            for step, ckpt in checkpoints(train_dir) if last is None or step < last
            for name, cfg in evals.items()]


def run_points(evals: dict[str, dict[str, Any]], row_dir: Path, run_stage: Callable[[dict[str, Any]], Any],
               retrained: bool) -> dict[str, int]:
    """Score every trajectory point not yet scored; returns {"points": all, "scored": run now}.
    `retrained`: the row trained again in this attempt, so points of an earlier training are stale."""
    if retrained:
        shutil.rmtree(row_dir / TRAJECTORY_DIR, ignore_errors=True)
    points = planned_points(evals, row_dir)
    scored = 0
    for _, _, cfg in points:
        out = Path(cfg["output_dir"])
        if (out / POINT_RESULTS).is_file():
            continue  # scored in an earlier attempt
        shutil.rmtree(out, ignore_errors=True)  # half-written by an attempt that did not finish
        run_stage(cfg)
        scored += 1
    return {"points": len(points), "scored": scored}


# ---- reading them back (the report) ----



def read_likelihood(path: Path) -> dict[int, dict[str, Any]] | None:
    """likelihood.jsonl as {sample index: record} (records without an index in line order); None when the
    file is missing or unreadable."""
    records = read_jsonl(path)
    if not records:
        return None
    return {r["index"] if isinstance(r.get("index"), int) else i: r for i, r in enumerate(records)}


def paired_value(measure: str, role: str, base: dict[int, dict], row: dict[int, dict]) -> float | None:
    """A point's style gain (role style) or retention (role retention) in `measure`, as the mean over
    the samples both scored of the per-sample paired difference from the base row (module docstring)."""
    common = sorted(set(base) & set(row))
    if measure == "kl":
        values = [row[i]["kl"] for i in common if isinstance(row[i].get("kl"), (int, float))]
        sign = -1.0 if role == "retention" else 1.0
        return sign * statistics.fmean(values) if values else None
    pairs = [(base[i].get("nll"), row[i].get("nll")) for i in common]
    diffs = [b - r for b, r in pairs if isinstance(b, (int, float)) and isinstance(r, (int, float))]
    return statistics.fmean(diffs) if diffs else None


def trajectory_measures(decide_on: dict[str, str] | None) -> dict[str, str]:
    """The measure drawn on each axis: the spec's decide_on, where a point without generation has it."""
    chosen = {**DEFAULT_DECIDE_ON, **(decide_on or {})}
    return {role: (m if m in TRAJECTORY_MEASURES else "nll") for role, m in chosen.items()
            if role in DEFAULT_DECIDE_ON}


@dataclass
class Trajectory:
    """One (row, seed)'s path: (step, style gain, retention) from step 0 (the base model) to the end."""

    row_id: int
    name: str
    seed: int
    labels: dict[str, Any]
    points: list[tuple[int, float, float]] = field(default_factory=list)


def path_points(base: dict[str, dict[int, dict]], steps: dict[int, dict[str, dict[int, dict]]],
                sets: dict[str, str], measures: dict[str, str]) -> list[tuple[int, float, float]]:
    """(step, style, retention) per step where both sets were scored; step 0 is the base at (0, 0).
    base: {eval set: likelihood}; steps: {step: {eval set: likelihood}}; sets: {role: eval set}."""
    points = [(0, 0.0, 0.0)]
    for step in sorted(steps):
        xy = [paired_value(measures[role], role, base[sets[role]], steps[step][sets[role]])
              if sets[role] in base and sets[role] in steps[step] else None for role in ("style", "retention")]
        if None not in xy:
            points.append((step, xy[0], xy[1]))
    return points


def _step_files(row_dir: Path, sets: list[str]) -> dict[int, dict[str, Path]]:
    """{step: {eval set: likelihood.jsonl}} of the scored checkpoints and of the final weights."""
    found: dict[int, dict[str, Path]] = {}
    for name in sets:
        for point in (row_dir / TRAJECTORY_DIR / name).glob("step-*"):
            step = point.name.split("-")[1]
            if step.isdigit() and (point / LIKELIHOOD_FILE).is_file():
                found.setdefault(int(step), {})[name] = point / LIKELIHOOD_FILE
    last = final_step(row_dir / "train")
    finals = {name: row_dir / name / LIKELIHOOD_FILE for name in sets if (row_dir / name / LIKELIHOOD_FILE).is_file()}
    if last is not None and finals:
        found.setdefault(last, {}).update(finals)
    return found


def read_trajectories(study_dir: Path, plan: dict[str, Any], roles: dict[str, str],
                      decide_on: dict[str, str] | None = None) -> list[Trajectory]:
    """Every trained (row, seed) with at least one point besides the base; [] without a base row or
    without per-sample likelihood files."""
    sets = {role: next((n for n, r in roles.items() if r == role), None) for role in ("style", "retention")}
    entries = plan.get("rows", [])
    base_entry = next((e for e in entries if e["id"] == 0), None)
    if base_entry is None or None in sets.values():
        return []
    base = {n: lik for n in sets.values()
            if (lik := read_likelihood(study_dir / base_entry["dir"] / n / LIKELIHOOD_FILE)) is not None}
    measures = trajectory_measures(decide_on)
    out = []
    for entry in entries:
        if entry["id"] == 0:
            continue
        files = _step_files(study_dir / entry["dir"], list(sets.values()))
        steps = {step: {n: lik for n, p in by_set.items() if (lik := read_likelihood(p)) is not None}
                 for step, by_set in files.items()}
        points = path_points(base, steps, sets, measures)
        if len(points) > 1:
            out.append(Trajectory(entry["id"], entry["name"], entry["seed"], entry.get("labels", {}), points))
    return out
