"""A study's numbers, read back from its run directories only (plan.json, row.json, each stage's
results files and per-sample files), plus the published 2023 table. Pure over files; no torch, no model.

Per (row, seed) a `RunResult`; per row a `Row` with the mean and the spread over seeds of every column.
Columns: trainable_params, train_loss, train_runtime, <set>_<metric> for each eval set and BLEU/ROUGE
metric, <set>_nll / <set>_perplexity / <set>_kl (token-weighted means from the stage's results file),
and the derived ones:
    style       = mean of the 4 metrics on the style set (persona)      -- all scores are x100
    general     = mean of the 4 metrics on the retention set (general)
    style_gain  = style - style of the base row (row 0): what training taught          (bleu_rouge)
    retention   = general - general of the base row: knowledge kept (0) or lost (< 0)  (bleu_rouge)
    <set>_<metric>_delta = that score minus the base row's
and, from the per-sample files (likelihood.jsonl, generated_predictions.jsonl), each a mean over eval
samples of a per-sample paired difference from the base row on the same sample (paired by "index", by
line order in files without it):
    style_gain_nll  = base NLL - row NLL of the style references (nats/token; > 0 = persona more likely)
    retention_nll   = base NLL - row NLL of the general references (< 0 = knowledge lost)
    style_kl        = KL(base || row) on the style set: how far the model drifted there (>= 0)
    retention_kl    = -KL(base || row) on the general set: label-free forgetting (<= 0)
    <column>_se     = standard error of that mean over samples (std of the differences / sqrt(n))
Each of these and style_gain / retention gets a confidence interval per row (Row.ci, `<column>_lo` and
`<column>_hi` in results.csv): a paired bootstrap over eval samples (stats.py), seeds pooled (a row's
per-sample value is the mean over its seeds on that sample). Study.paired keeps the per-sample
differences, so conclusions.py resamples every row on the same samples. BLEU/ROUGE pair only on the
generated subset (`--max_generate_samples`), likelihood measures on every scored sample.
Noise of a row's style gain / retention (Row.noise, for the error bars): the seed spread with several
seeds, else the per-sample standard error. The base row is evaluated once: its differences are 0.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError
from tunelab.names import (LIKELIHOOD_FILE, METRIC_KEYS, PLAN_FILE, PREDICTIONS_FILE, ROW_FILE, TRAINABLE_FILE,
                           TRAINER_STATE_FILE, results_file)
from tunelab.plotting import loss_points
from tunelab.study import stats
from tunelab.study.files import number, read_json_object, read_jsonl, stage_results
from tunelab.study.spec import MEASURES

METRICS = METRIC_KEYS
LIKELIHOOD_KEYS = ("nll", "perplexity", "kl")  # {stage}_<key> in a stage's results file -> <set>_<key>
# (role, measure) -> the column of a row's difference from the base row (the spec's decide_on vocabulary)
MEASURE_COLUMNS = {("style", "nll"): "style_gain_nll", ("retention", "nll"): "retention_nll",
                   ("style", "kl"): "style_kl", ("retention", "kl"): "retention_kl",
                   ("style", "bleu_rouge"): "style_gain", ("retention", "bleu_rouge"): "retention"}
# column -> (role, per-sample measure, sign): per-sample value = sign * (row - base) on the same sample
PAIRED = {"style_gain_nll": ("style", "nll", -1), "retention_nll": ("retention", "nll", -1),
          "style_kl": ("style", "kl", 1), "retention_kl": ("retention", "kl", -1),
          "style_gain": ("style", "bleu_rouge", 1), "retention": ("retention", "bleu_rouge", 1)}
POINT_FROM_FILES = ("style_gain", "retention")  # 2023 columns: their point stays the results files' mean
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
    likelihood: dict[str, str] = field(default_factory=dict)   # eval set -> likelihood.jsonl, relative


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
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # paired-bootstrap interval of a column

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
class Paired:
    """One column's per-sample differences from the base row (seeds pooled), every row on the same
    eval samples, so one resample of those samples applies to all rows at once."""

    column: str
    eval_set: str
    index: list[int]                                           # the eval samples, in order
    diffs: dict[int, np.ndarray] = field(default_factory=dict)  # row id -> (len(index),)

    def replicates(self, replicates: int = stats.REPLICATES, seed: int = stats.SEED) -> dict[int, np.ndarray]:
        """Row id -> (1 + B,) mean difference on the original samples, then on each resample; the
        draw is keyed by the eval set, so every column of one set shares it."""
        idx = stats.draw(len(self.index), replicates, seed, key=self.eval_set)
        ids = list(self.diffs)
        means = stats.replicate_means(np.stack([self.diffs[i] for i in ids]), idx)
        return dict(zip(ids, means))


@dataclass
class Study:
    name: str
    scale: str | None
    roles: dict[str, str]            # eval set -> style / retention / other
    rows: list[Row]
    meta: dict[str, Any] = field(default_factory=dict)
    paired: dict[str, Paired] = field(default_factory=dict)  # column -> per-sample differences of every row

    @property
    def eval_sets(self) -> list[str]:
        return list(self.roles)

    def role_set(self, role: str) -> str | None:
        return next((name for name, r in self.roles.items() if r == role), None)

    def row(self, row_id: int) -> Row | None:
        return next((r for r in self.rows if r.id == row_id), None)


# ---- reading a study dir ----



def read_study(study_dir: str | Path) -> Study:
    """Every row of a study dir, aggregated over seeds, with derived columns against row 0."""
    study_dir = Path(study_dir)
    plan = read_json_object(study_dir / PLAN_FILE)
    if not plan.get("rows"):
        raise TunelabError(f"{study_dir} is not a study directory (no plan.json with rows): "
                           "run `tunelab study SPEC.yaml` first")
    roles = plan.get("eval_sets") or {name: "other" for name in plan["rows"][0]["evals"]}
    runs = [read_run(study_dir, entry, list(roles)) for entry in plan["rows"]]
    per_run = paired_samples(study_dir, runs, roles)
    rows = aggregate(runs, roles)
    paired = pool_seeds(rows, per_run, roles)
    add_intervals(rows, paired)
    return Study(name=plan.get("name", study_dir.name), scale=plan.get("scale"), roles=roles, rows=rows,
                 meta={k: v for k, v in plan.items() if k != "rows"}, paired=paired)


def read_run(study_dir: Path, entry: dict[str, Any], eval_sets: list[str]) -> RunResult:
    """One (row, seed) from its row.json and stage dirs; missing files leave columns out."""
    row_dir = study_dir / entry["dir"]
    record = read_json_object(row_dir / ROW_FILE)
    run = RunResult(id=entry["id"], name=entry["name"], seed=entry["seed"], labels=entry.get("labels", {}),
                    dir=entry["dir"], status=record.get("status", "pending"), error=record.get("error"))
    trainable = read_json_object(row_dir / "train" / TRAINABLE_FILE)
    train = read_json_object(row_dir / "train" / results_file("train"))
    for column, value in (("trainable_params", trainable.get("trainable_params")),
                          ("trainable_percent", trainable.get("trainable_percent")),
                          ("train_loss", train.get("train_loss")), ("train_runtime", train.get("train_runtime"))):
        if isinstance(value, (int, float)):
            run.values[column] = float(value)
    state = read_json_object(row_dir / "train" / TRAINER_STATE_FILE)
    run.loss_curve = list(zip(*loss_points(state.get("log_history", []))))
    for name in eval_sets:
        _read_eval(run, row_dir / name, name, f"{entry['dir']}/{name}")
    return run


def _read_eval(run: RunResult, stage_dir: Path, name: str, rel: str) -> None:
    results = stage_results(stage_dir)
    for key in (*METRICS, *LIKELIHOOD_KEYS):
        value = next((v for p in ("predict_", "eval_") if isinstance(v := results.get(p + key), (int, float))), None)
        if value is not None:
            run.values[f"{name}_{key}"] = float(value)
    if (stage_dir / PREDICTIONS_FILE).is_file():
        run.predictions[name] = f"{rel}/{PREDICTIONS_FILE}"
    if (stage_dir / LIKELIHOOD_FILE).is_file():
        run.likelihood[name] = f"{rel}/{LIKELIHOOD_FILE}"


# ---- per-sample values and paired differences ----

Samples = dict[int, float]  # eval sample index -> value




def _index(row: dict[str, Any], position: int) -> int:
    index = row.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def read_likelihood(path: Path) -> dict[str, Samples]:
    """{"nll": {index: nll}, "kl": {index: kl}} from a likelihood.jsonl (one line per eval sample:
    index, tokens, nll, kl). A null value (a sample without response tokens; kl without the base
    model's log-probs) leaves that sample out of that measure; a measure with no value is left out."""
    out: dict[str, Samples] = {"nll": {}, "kl": {}}
    for position, row in enumerate(read_jsonl(path)):
        for measure, samples in out.items():
            value = number(row.get(measure))
            if value is not None:
                samples[_index(row, position)] = value
    return {m: v for m, v in out.items() if v}


def sample_scores(path: Path) -> dict[int, tuple[str, float]] | None:
    """index -> (label, mean of the 4 metrics) per sample of a predictions file; None when it cannot be scored."""
    try:
        from tunelab.metrics import score_pair
    except ImportError:
        return None
    rows = read_jsonl(path)
    if not rows or not all(isinstance(r.get("predict"), str) and isinstance(r.get("label"), str) for r in rows):
        return None
    return {_index(r, i): (r["label"], statistics.fmean(score_pair(r["predict"], r["label"]).values()))
            for i, r in enumerate(rows)}


def run_samples(study_dir: Path, run: RunResult, eval_set: str) -> tuple[dict[str, Samples], dict[int, str]]:
    """(measure -> per-sample values, index -> reference label) of one run on one eval set."""
    values = read_likelihood(study_dir / run.likelihood[eval_set]) if eval_set in run.likelihood else {}
    labels: dict[int, str] = {}
    scores = sample_scores(study_dir / run.predictions[eval_set]) if eval_set in run.predictions else None
    if scores:
        values["bleu_rouge"] = {i: score for i, (_, score) in scores.items()}
        labels = {i: label for i, (label, _) in scores.items()}
    return values, labels


def paired_difference(row: Samples, base: Samples, sign: int, row_labels: dict[int, str] | None = None,
                      base_labels: dict[int, str] | None = None) -> Samples | None:
    """sign * (row - base) on every sample both have; None when none is shared, or when the two files
    hold other references on the same index (not the same samples)."""
    common = sorted(set(row) & set(base))
    if row_labels and base_labels and any(row_labels.get(i) != base_labels.get(i) for i in common):
        return None
    return {i: sign * (row[i] - base[i]) for i in common} or None


def paired_samples(study_dir: Path, runs: list[RunResult], roles: dict[str, str]) -> dict[str, dict[str, Samples]]:
    """column -> run dir -> per-sample difference from the base row, for every finished run (the base
    run against itself included: all 0). Sets each run's `<column>` (likelihood columns; BLEU/ROUGE keep
    the results files' value) and `<column>_se`."""
    base = next((r for r in runs if r.id == 0 and r.status == "done"), None)
    out: dict[str, dict[str, Samples]] = {}
    if base is None:
        return out
    sets = {role: next((n for n, r in roles.items() if r == role), None) for role in ("style", "retention")}
    for eval_set in {s for s in sets.values() if s}:
        columns = [c for c, (role, _, _) in PAIRED.items() if sets[role] == eval_set]
        base_samples = run_samples(study_dir, base, eval_set)
        for run in (r for r in runs if r.status == "done"):
            samples = base_samples if run is base else run_samples(study_dir, run, eval_set)
            for column, diff in _pair_run(samples, base_samples, columns).items():
                out.setdefault(column, {})[run.dir] = diff
                _set_point(run, column, list(diff.values()))
    return out


def _pair_run(samples: tuple[dict[str, Samples], dict[int, str]], base: tuple[dict[str, Samples], dict[int, str]],
              columns: list[str]) -> dict[str, Samples]:
    """column -> one run's per-sample difference from the base run on one eval set."""
    (values, labels), (base_values, base_labels) = samples, base
    out = {}
    for column in columns:
        _, measure, sign = PAIRED[column]
        if measure not in values:
            continue
        # KL is already a divergence from the base model: the base's own is 0 where it has none
        base_m = base_values.get(measure) or (dict.fromkeys(values[measure], 0.0) if measure == "kl" else None)
        diff = None if base_m is None else paired_difference(values[measure], base_m, sign, labels, base_labels)
        if diff is not None:
            out[column] = diff
    return out


def _set_point(run: RunResult, column: str, diffs: list[float]) -> None:
    if column not in POINT_FROM_FILES:
        run.values[column] = statistics.fmean(diffs)
    if len(diffs) >= 2:
        run.values[f"{column}_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5


def pool_seeds(rows: list[Row], per_run: dict[str, dict[str, Samples]], roles: dict[str, str]) -> dict[str, Paired]:
    """column -> Paired: each row's per-sample difference averaged over its seeds, on the samples every
    row of the column has (>= 2 samples, else no table and no interval)."""
    out = {}
    for column, by_run in per_run.items():
        pooled: dict[int, Samples] = {}
        for row in rows:
            seeds = [by_run[r.dir] for r in row.runs if r.dir in by_run]
            if seeds:
                common = set.intersection(*(set(s) for s in seeds))
                pooled[row.id] = {i: statistics.fmean(s[i] for s in seeds) for i in common}
        index = sorted(set.intersection(*(set(p) for p in pooled.values()))) if pooled else []
        if len(index) >= 2:
            eval_set = next(n for n, r in roles.items() if r == PAIRED[column][0])
            table = Paired(column=column, eval_set=eval_set, index=index)
            table.diffs = {rid: np.array([p[i] for i in index]) for rid, p in pooled.items()}
            out[column] = table
    return out


def add_intervals(rows: list[Row], paired: dict[str, Paired]) -> None:
    """Row.ci[column] = the paired-bootstrap percentile interval of each row's mean difference."""
    for column, table in paired.items():
        for row_id, reps in table.replicates().items():
            _, lo, hi = stats.interval(reps)
            row = next(r for r in rows if r.id == row_id)
            if lo is not None and hi is not None:
                row.ci[column] = (lo, hi)


def _has_measure(stage_dir: Path, measure: str) -> bool:
    if measure == "bleu_rouge":
        return (stage_dir / PREDICTIONS_FILE).is_file()
    return measure in read_likelihood(stage_dir / LIKELIHOOD_FILE)


def check_measures(study_dir: str | Path, row_dirs: list[str], roles: dict[str, str],
                   decide_on: dict[str, str]) -> None:
    """Before a study (re)runs: every finished row must carry the per-sample files `decide_on` needs,
    else its rows were scored another way (an older tunelab wrote no likelihood.jsonl) and the verdicts
    would mix measures. One-line TunelabError naming the key and the measures these rows do have."""
    study_dir = Path(study_dir)
    done = [d for d in row_dirs if read_json_object(study_dir / d / "row.json").get("status") == "done"]
    for role, measure in decide_on.items():
        eval_set = next((n for n, r in roles.items() if r == role), None)
        if eval_set is None or not done:
            continue
        lacking = [d for d in done if not _has_measure(study_dir / d / eval_set, measure)]
        if lacking:
            have = [m for m in MEASURES[role] if all(_has_measure(study_dir / d / eval_set, m) for d in done)]
            more = f" and {len(lacking) - 1} more finished rows" if len(lacking) > 1 else ""
            raise TunelabError(
                f"decide_on: {role}: {measure} needs per-sample {measure} in every finished row, but "
                f"{lacking[0]}/{eval_set}{more} has none (scored by an older tunelab, or kl without the base "
                f"log-probs): valid for this study dir: {', '.join(have) or 'none'}; set decide_on to one of them, "
                f"or use a new --output_dir")


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
