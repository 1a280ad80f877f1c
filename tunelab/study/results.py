"""A study's numbers, read back from its run directories only (plan.json, row.json, each stage's
results files), plus the published 2023 table. Pure over files; no torch, no model.

Per (row, seed) a `RunResult`; per row a `Row` with the mean and the spread over seeds of every column.
Columns: trainable_params, train_loss, train_runtime, <set>_<metric> for each eval set and metric, and
the derived ones:
    style       = mean of the 4 metrics on the style set (persona)      -- all scores are x100
    general     = mean of the 4 metrics on the retention set (general)
    style_gain  = style - style of the base row (row 0): what training taught
    retention   = general - general of the base row: knowledge kept (0) or lost (< 0)
    <set>_<metric>_delta = that score minus the base row's
    style_gain_se, retention_se = standard error of that difference over eval samples (see below)
Noise of a row's style gain / retention: with several seeds, the sample standard deviation over seeds
(ddof 1); with one seed, the standard error of the paired per-sample difference from the base row
(std over samples of row score - base score on the same sample, / sqrt(n)), which is what 24 or 100
eval samples leave uncertain. A difference within its noise is marked not significant. The base row is
evaluated once, so it has no noise of its own.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.names import (METRIC_KEYS, PLAN_FILE, PREDICTIONS_FILE, ROW_FILE, TRAINABLE_FILE, TRAINER_STATE_FILE,
                           results_file)
from tunelab.plotting import loss_points

METRICS = METRIC_KEYS
REFERENCE_FILE = "seed_study_2023_04_24_results.json"
REFERENCE_LABEL = "ChatGLM-6B on other data (ChatNVL 2023-04-24), not comparable in absolute terms"


@dataclass
class RunResult:
    """One (row, seed) as found on disk."""

    id: int
    name: str
    seed: int
    labels: dict[str, Any]
    dir: str
    status: str = "pending"
    error: str | None = None
    values: dict[str, float] = field(default_factory=dict)   # column -> value
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    predictions: dict[str, str] = field(default_factory=dict)  # eval set -> path relative to the study dir


@dataclass
class Row:
    """One row over its seeds: means and spreads of every column."""

    id: int
    name: str
    labels: dict[str, Any]
    status: str
    runs: list[RunResult] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)  # only columns with >= 2 seeds

    def noise(self, column: str) -> float | None:
        """Seed spread of a column when there are >= 2 seeds, else its eval-sample standard error."""
        return self.spread.get(column, self.mean.get(f"{column}_se"))

    def not_significant(self, column: str) -> bool | None:
        """True when |mean| (a difference from base) is within its noise; None when no noise is known."""
        noise = self.noise(column)
        if noise is None or column not in self.mean:
            return None
        return abs(self.mean[column]) <= noise


@dataclass
class Study:
    name: str
    scale: str | None
    roles: dict[str, str]            # eval set -> style / retention / other
    rows: list[Row]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_sets(self) -> list[str]:
        return list(self.roles)

    def role_set(self, role: str) -> str | None:
        return next((name for name, r in self.roles.items() if r == role), None)

    def row(self, row_id: int) -> Row | None:
        return next((r for r in self.rows if r.id == row_id), None)


# ---- reading a study dir ----

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_study(study_dir: str | Path) -> Study:
    """Every row of a study dir, aggregated over seeds, with derived columns against row 0."""
    study_dir = Path(study_dir)
    plan = _read_json(study_dir / PLAN_FILE)
    if not plan.get("rows"):
        raise TunelabError(f"{study_dir} is not a study directory (no plan.json with rows): "
                           "run `tunelab study SPEC.yaml` first")
    roles = plan.get("eval_sets") or {name: "other" for name in plan["rows"][0]["evals"]}
    runs = [read_run(study_dir, entry, list(roles)) for entry in plan["rows"]]
    add_sample_noise(study_dir, runs, roles)
    rows = aggregate(runs, roles)
    return Study(name=plan.get("name", study_dir.name), scale=plan.get("scale"), roles=roles, rows=rows,
                 meta={k: v for k, v in plan.items() if k != "rows"})


def read_run(study_dir: Path, entry: dict[str, Any], eval_sets: list[str]) -> RunResult:
    """One (row, seed) from its row.json and stage dirs; missing files leave columns out."""
    row_dir = study_dir / entry["dir"]
    record = _read_json(row_dir / ROW_FILE)
    run = RunResult(id=entry["id"], name=entry["name"], seed=entry["seed"], labels=entry.get("labels", {}),
                    dir=entry["dir"], status=record.get("status", "pending"), error=record.get("error"))
    trainable = _read_json(row_dir / "train" / TRAINABLE_FILE)
    train = _read_json(row_dir / "train" / results_file("train"))
    for column, value in (("trainable_params", trainable.get("trainable_params")),
                          ("trainable_percent", trainable.get("trainable_percent")),
                          ("train_loss", train.get("train_loss")), ("train_runtime", train.get("train_runtime"))):
        if isinstance(value, (int, float)):
            run.values[column] = float(value)
    state = _read_json(row_dir / "train" / TRAINER_STATE_FILE)
    run.loss_curve = list(zip(*loss_points(state.get("log_history", []))))
    for name in eval_sets:
        _read_eval(run, row_dir / name, name, f"{entry['dir']}/{name}")
    return run


def _read_eval(run: RunResult, stage_dir: Path, name: str, rel: str) -> None:
    results = _read_json(stage_dir / results_file("predict")) or _read_json(stage_dir / results_file("eval"))
    for metric in METRICS:
        for prefix in ("predict_", "eval_"):
            value = results.get(prefix + metric)
            if isinstance(value, (int, float)):
                run.values[f"{name}_{metric}"] = float(value)
                break
    if (stage_dir / PREDICTIONS_FILE).is_file():
        run.predictions[name] = f"{rel}/{PREDICTIONS_FILE}"


# ---- eval-sample noise (one seed) ----

def sample_scores(path: Path) -> list[tuple[str, float]] | None:
    """(label, mean of the 4 metrics) per sample of a predictions file; None when it cannot be scored."""
    try:
        from tunelab.metrics import read_predictions, score_pair

        preds, labels = read_predictions(path)
    except (ImportError, TunelabError):
        return None
    return [(label, statistics.fmean(score_pair(pred, label).values())) for pred, label in zip(preds, labels)]


def paired_se(scores: list[tuple[str, float]], base: list[tuple[str, float]]) -> float | None:
    """Standard error of mean(row - base) over samples; None unless both scored the same samples."""
    if len(scores) != len(base) or len(scores) < 2 or any(a[0] != b[0] for a, b in zip(scores, base)):
        return None
    return statistics.stdev(a[1] - b[1] for a, b in zip(scores, base)) / len(scores) ** 0.5


def add_sample_noise(study_dir: Path, runs: list[RunResult], roles: dict[str, str]) -> None:
    """style_gain_se / retention_se per trained run, from its predictions and the base row's."""
    base = next((r for r in runs if r.id == 0 and r.status == "done"), None)
    cache: dict[str, list[tuple[str, float]] | None] = {}

    def scores(rel: str) -> list[tuple[str, float]] | None:
        if rel not in cache:
            cache[rel] = sample_scores(study_dir / rel)
        return cache[rel]

    for column, role in (("style_gain", "style"), ("retention", "retention")):
        eval_set = next((n for n, r in roles.items() if r == role), None)
        if base is None or eval_set not in base.predictions or not (base_scores := scores(base.predictions[eval_set])):
            continue
        for run in runs:
            if run.id != 0 and run.status == "done" and eval_set in run.predictions:
                se = paired_se(scores(run.predictions[eval_set]) or [], base_scores)
                if se is not None:
                    run.values[f"{column}_se"] = se


# ---- aggregation and derived columns ----

def _set_mean(values: dict[str, float], eval_set: str | None) -> float | None:
    scores = [values.get(f"{eval_set}_{m}") for m in METRICS] if eval_set else []
    return sum(scores) / len(scores) if scores and all(s is not None for s in scores) else None


def add_derived(runs: list[RunResult], roles: dict[str, str]) -> None:
    """style/general per run, and every difference from the base row (id 0), in place."""
    style_set = next((n for n, r in roles.items() if r == "style"), None)
    general_set = next((n for n, r in roles.items() if r == "retention"), None)
    for run in runs:
        for column, eval_set in (("style", style_set), ("general", general_set)):
            value = _set_mean(run.values, eval_set)
            if value is not None:
                run.values[column] = value
    base = next((r for r in runs if r.id == 0 and r.status == "done"), None)
    if base is None:
        return
    deltas = [(f"{s}_{m}", f"{s}_{m}_delta") for s in roles for m in METRICS]
    deltas += [("style", "style_gain"), ("general", "retention")]
    for run in runs:
        for column, delta in deltas:
            if column in run.values and column in base.values:
                run.values[delta] = run.values[column] - base.values[column]


def aggregate(runs: list[RunResult], roles: dict[str, str]) -> list[Row]:
    """Rows in id order; means over the seeds that finished, spreads when >= 2 did."""
    add_derived(runs, roles)
    rows = []
    for row_id in sorted({r.id for r in runs}):
        group = [r for r in runs if r.id == row_id]
        statuses = {r.status for r in group}
        row = Row(id=row_id, name=group[0].name, labels=group[0].labels,
                  status=statuses.pop() if len(statuses) == 1 else "partial", runs=group)
        done = [r for r in group if r.status == "done"]
        for column in sorted({c for r in done for c in r.values}):
            values = [r.values[column] for r in done if column in r.values]
            row.mean[column] = statistics.fmean(values)
            if len(values) >= 2:
                row.spread[column] = statistics.stdev(values)
        rows.append(row)
    return rows


# ---- the published 2023 table ----

_LAYERS_2023 = {"25-27": "last3", "0-2": "first3", "0-27": "all"}
_WEIGHTS_2023 = {"query_key_value": "qkv", "prefix_encoder": "prefix"}


def load_reference() -> tuple[dict[str, Any], Study]:
    """The published 2023 results (shipped with the package) as a Study with our label vocabulary.

    Labels are normalized (25-27 -> last3, 0-2 -> first3, 0-27 -> all, query_key_value -> qkv) so the
    conclusions check runs on it unchanged; `published` keeps the original labels for display."""
    text = resources.files("tunelab.study").joinpath("reference", REFERENCE_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    roles = {"persona": "style", "general": "retention"}
    runs = []
    for entry in data["rows"]:
        labels = {"method": entry["method"], "weights": _WEIGHTS_2023.get(entry["weights"], entry["weights"]),
                  "layers": _LAYERS_2023.get(entry["layers"], entry["layers"]), "aux": entry["aux"],
                  "published": {k: entry[k] for k in ("method", "weights", "layers", "aux")}}
        run = RunResult(id=entry["id"], name=f"2023_row{entry['id']}", seed=0, labels=labels, dir="", status="done")
        run.values = {f"{s}_{m}": float(entry[f"{s}_{m}"]) for s in roles for m in METRICS}
        runs.append(run)
    meta = {k: v for k, v in data.items() if k != "rows"}
    return meta, Study(name="ChatNVL 2023-04-24", scale=None, roles=roles, rows=aggregate(runs, roles), meta=meta)
