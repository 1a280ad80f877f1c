"""Study specs: load and validate a study YAML, and expand it into one plan per (row, seed). Pure:
nothing here touches a model or the disk except `load_spec` reading the file.

A spec (examples/study_2023_04_24.yaml is the full example):

    name: study_2023_04_24                 # default study dir: runs/<name> (runs/<name>_<scale> off-default)
    shared: {option: value}                # every stage of every row: model, data dir, template, lengths
    train: {option: value}                 # every training stage: dataset, lr, epochs, schedule, batch
    eval: {option: value}                  # every eval stage: batch size, decoding
    eval_sets:                             # name -> data set (+ max_samples, role, any eval option)
      persona: {dataset: persona_chat_en_test, max_samples: 100, role: style}
      general: {dataset: alpaca_gpt4_en, max_samples: 100, role: retention}
    aux_dataset: oaast_sft_zh              # appended to the train data set of rows labelled aux: true
    base: true                             # row 0 = the base model, evaluated once and shared
    seeds: [42]                            # every trained row runs once per seed
    rows:                                  # explicit rows; labels fill the report table
      - {id: 1, name: freeze_mlp_last3, method: freeze, weights: mlp, layers: last3, aux: false,
         options: {num_layer_trainable: 3, name_module_trainable: mlp}}
    # or, instead of rows, named axes crossed in order (value label -> options):
    # axes: {method: {lora: {}, freeze: {}}, aux: {false: {}, true: {}}}
    eval_every: 8                          # optional: score the cheap measures every 8 training steps
                                           # (a trajectory per row; tunelab/study/trajectory.py)
    scales:                                # named overrides of sizes; same sections as above
      quick: {train: {max_samples: 32}, eval_sets: {persona: {max_samples: 24}}}
      full: {}
    default_scale: quick
    decide_on: {style: nll, retention: nll}   # the measures the verdicts rest on (default shown)

`decide_on` picks, per role, the per-sample measure the four conclusions are decided on:
    nll         style: base NLL - row NLL of the persona references (> 0 = the persona's replies became
                more likely); retention: the same on the general references (< 0 = knowledge lost)
    kl          retention only: -KL(base || row) on the general references (label-free drift, <= 0).
                Not valid for style: moving away from the base model says how far the model moved,
                not whether it moved toward the persona (style drift is still shown in the report)
    bleu_rouge  the 2023 reading: mean of BLEU-4 and ROUGE-1/2/L x100 minus the base row's
The report shows the BLEU/ROUGE verdicts beside the decide_on ones whatever is chosen.

Option names everywhere are tunelab's (`tunelab train --help`); unknown keys fail with the closest
valid names. The runner owns the per-stage options (output_dir, do_train/do_predict, checkpoint_dir,
seed, ...), so a spec cannot set them.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, closest
from tunelab.names import PROMPT_OPTIONS

SPEC_KEYS = ("name", "description", "output_dir", "shared", "train", "eval", "eval_sets", "aux_dataset",
             "base", "seeds", "rows", "axes", "scales", "default_scale", "decide_on")
SCALE_KEYS = ("description", "shared", "train", "eval", "eval_sets", "seeds")
LABELS = ("method", "weights", "layers", "aux", "variant")  # table columns; `variant` is free-form
ROW_KEYS = ("id", "name", "options", *LABELS)
ROLES = ("style", "retention", "other")  # style = what training should teach; retention = what it may cost
DEFAULT_ROLES = {"persona": "style", "general": "retention"}
# decide_on: role -> the measures valid for it (see the module docstring); the default uses the sensitive ones
MEASURES = {"style": ("nll", "bleu_rouge"), "retention": ("nll", "kl", "bleu_rouge")}
DEFAULT_DECIDE_ON = {"style": "nll", "retention": "nll"}
# Set per stage by the runner; a spec setting them would fight it (seeds go in `seeds:`).
RUNNER_OPTIONS = ("output_dir", "do_train", "do_eval", "do_predict", "predict_with_generate", "checkpoint_dir",
                  "overwrite_output_dir", "resume_from_checkpoint", "seed")
# Options an eval stage takes from its row's training config, so prompts are formatted as in training
# even when a row overrides them (tunelab eval would inherit them from the checkpoint too).
FORMAT_OPTIONS = ("model_name_or_path", "dataset_dir", *PROMPT_OPTIONS)

# Trajectories: `eval_every: N` (top level or in a scale) saves a checkpoint every N training steps and
# scores the cheap measures at each (tunelab/study/trajectory.py). Kept as its own block.
TRAJECTORY_KEYS = ("eval_every",)
SPEC_KEYS += TRAJECTORY_KEYS
SCALE_KEYS += TRAJECTORY_KEYS


def check_eval_every(value: Any, where: str) -> int | None:
    """None (no trajectories) or a positive integer number of training steps."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise TunelabError(f"{where}: eval_every must be a positive integer number of training steps "
                       f"(or left out for no trajectories), got {value!r}")


@dataclass
class Spec:
    """A validated study spec. `rows` are normalized: {id, name, labels, options}."""

    name: str
    shared: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    eval_sets: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    description: str = ""
    output_dir: str | None = None
    aux_dataset: str | None = None
    base: bool = True
    eval_every: int | None = None  # trajectories: score the cheap measures every N training steps
    seeds: list[int] = field(default_factory=lambda: [42])
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_scale: str | None = None
    decide_on: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DECIDE_ON))


@dataclass
class RowPlan:
    """One (row, seed) of a study: its labels, run dir and the option dict of each stage."""

    id: int
    name: str
    seed: int
    labels: dict[str, Any]
    dir: str                      # relative to the study dir: rows/r07_freeze_qkv_first3_s42
    train: dict[str, Any] | None  # None for the base row, which only evaluates
    evals: dict[str, dict[str, Any]]
    eval_every: int | None = None  # trajectory points every N training steps (tunelab/study/trajectory.py)

    def stages(self) -> list[tuple[str, dict[str, Any]]]:
        """(stage name, options) in run order: train first, then each eval set."""
        return ([("train", self.train)] if self.train else []) + list(self.evals.items())

    def fingerprint(self) -> str:
        """Hash of what the row computes; paths left out so a moved study dir still matches."""
        def strip(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if cfg is None else {k: v for k, v in cfg.items() if k not in ("output_dir", "checkpoint_dir")}

        payload = [strip(self.train), {k: strip(v) for k, v in self.evals.items()}]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint()}


# ---- loading and validation ----

def load_spec(path: str | Path) -> Spec:
    """Read and validate a study YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"study spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TunelabError(f"study spec {path} is not valid YAML: {err}") from None
    return parse_spec(data, where=str(path))


def parse_spec(data: Any, where: str = "spec") -> Spec:
    """Validate a spec mapping (as loaded from YAML) into a Spec."""
    _check_mapping(data, where)
    _check_keys(data, SPEC_KEYS, where)
    for key in ("name", "shared", "train", "eval_sets"):
        if key not in data:
            raise TunelabError(f"{where}: missing '{key}'")
    if ("rows" in data) == ("axes" in data):
        which = "both" if "rows" in data else "neither"
        raise TunelabError(f"{where}: give either 'rows' (explicit) or 'axes' (crossed), not {which}")
    shared, train, evals = (_options(data.get(k) or {}, f"{where}: {k}") for k in ("shared", "train", "eval"))
    eval_sets = {name: _eval_set(name, cfg, f"{where}: eval_sets")
                 for name, cfg in _mapping(data["eval_sets"], f"{where}: eval_sets").items()}
    scales = _mapping(data.get("scales") or {}, f"{where}: scales")
    if not eval_sets:
        raise TunelabError(f"{where}: eval_sets is empty")
    rows_raw = _rows_from_axes(data["axes"], where) if "axes" in data else data["rows"]
    spec = Spec(
        name=_str(data["name"], f"{where}: name"), shared=shared, train=train, eval=evals, eval_sets=eval_sets,
        rows=_normalize_rows(rows_raw, where), description=str(data.get("description") or ""),
        output_dir=data.get("output_dir"), aux_dataset=data.get("aux_dataset"), base=bool(data.get("base", True)),
        seeds=_seeds(data.get("seeds", [42]), f"{where}: seeds"),
        scales={n: _scale(n, s, eval_sets, where) for n, s in scales.items()},
        default_scale=data.get("default_scale"), decide_on=parse_decide_on(data.get("decide_on"), where))
    spec.eval_every = check_eval_every(data.get("eval_every"), where)
    _check_spec(spec, where)
    return spec


def _check_spec(spec: Spec, where: str) -> None:
    if spec.default_scale is not None and spec.default_scale not in spec.scales:
        raise TunelabError(f"{where}: default_scale '{spec.default_scale}' is not a scale: "
                           f"{closest(str(spec.default_scale), list(spec.scales))}")
    if "dataset" not in spec.train:
        raise TunelabError(f"{where}: train needs a 'dataset' (the style target the rows train on)")
    if any(r["labels"].get("aux") for r in spec.rows) and not spec.aux_dataset:
        raise TunelabError(f"{where}: rows labelled aux: true need an 'aux_dataset'")


def parse_decide_on(value: Any, where: str = "spec") -> dict[str, str]:
    """{role: measure} with the default filled in for a role not given; a bad key or measure fails."""
    where = f"{where}: decide_on"
    out = dict(DEFAULT_DECIDE_ON)
    for role, measure in _mapping(value if value is not None else {}, where).items():
        if role not in MEASURES:
            raise TunelabError(f"{where}: unknown key '{role}': valid: {', '.join(MEASURES)}")
        if measure not in MEASURES[role]:
            why = " (kl is drift from the base, not progress toward the persona)" if measure == "kl" else ""
            raise TunelabError(f"{where}: {role}: unknown measure {measure!r}{why}: "
                               f"valid: {', '.join(MEASURES[role])}")
        out[role] = measure
    return out


def _check_mapping(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise TunelabError(f"{where}: expected a mapping, got {type(data).__name__}")


def _mapping(data: Any, where: str) -> dict[str, Any]:
    _check_mapping(data, where)
    return data


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TunelabError(f"{where}: expected a non-empty string")
    return value


def _check_keys(data: dict[str, Any], valid: tuple[str, ...] | list[str], where: str) -> None:
    for key in data:
        if key not in valid:
            raise TunelabError(f"{where}: unknown key '{key}': {closest(str(key), list(valid))}")


def _options(data: Any, where: str) -> dict[str, Any]:
    """A mapping of tunelab options, checked against the parser's names and the runner's own."""
    from tunelab.hparams import option_names  # imports transformers: only when a spec is validated

    data = _mapping(data, where)
    valid = option_names()
    for key in data:
        if key in RUNNER_OPTIONS:
            raise TunelabError(f"{where}: '{key}' is set by the study runner per stage"
                               + (" (list seeds under 'seeds:')" if key == "seed" else ""))
        if key not in valid:
            raise TunelabError(f"{where}: unknown option '{key}': {closest(str(key), valid)}")
    return dict(data)


def _eval_set(name: str, cfg: Any, where: str) -> dict[str, Any]:
    where = f"{where}: {name}"
    cfg = dict(_mapping(cfg, where))
    role = cfg.pop("role", DEFAULT_ROLES.get(name, "other"))
    if role not in ROLES:
        raise TunelabError(f"{where}: unknown role '{role}': valid: {', '.join(ROLES)}")
    if name == "train" or not str(name).isidentifier():
        raise TunelabError(f"{where}: eval set names must be identifiers other than 'train'")
    options = _options(cfg, where)
    if "dataset" not in options:
        raise TunelabError(f"{where}: missing 'dataset'")
    return {"role": role, **options}


def _seeds(value: Any, where: str) -> list[int]:
    seeds = value if isinstance(value, list) else [value]
    ints = all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not ints or len(set(seeds)) != len(seeds):
        raise TunelabError(f"{where}: expected a list of distinct integers, got {value!r}")
    return seeds


def _scale(name: str, scale: Any, eval_sets: dict[str, Any], where: str) -> dict[str, Any]:
    where = f"{where}: scales: {name}"
    scale = dict(_mapping(scale or {}, where))
    _check_keys(scale, SCALE_KEYS, where)
    for key in ("shared", "train", "eval"):
        if key in scale:
            scale[key] = _options(scale[key] or {}, f"{where}: {key}")
    sets = _mapping(scale.get("eval_sets") or {}, f"{where}: eval_sets")
    for set_name, cfg in sets.items():
        if set_name not in eval_sets:
            raise TunelabError(f"{where}: eval_sets: unknown eval set '{set_name}': "
                               f"{closest(str(set_name), list(eval_sets))}")
        _options(cfg or {}, f"{where}: eval_sets: {set_name}")
    if "seeds" in scale:
        scale["seeds"] = _seeds(scale["seeds"], f"{where}: seeds")
    check_eval_every(scale.get("eval_every"), where)
    return scale


def _rows_from_axes(axes: Any, where: str) -> list[dict[str, Any]]:
    """Cross named axes (label -> {value label: options}) in order; ids 1..N, first axis slowest."""
    where = f"{where}: axes"
    axes = _mapping(axes, where)
    _check_keys(axes, LABELS, where)
    levels = []
    for axis, values in axes.items():
        values = _mapping(values, f"{where}: {axis}")
        if not values:
            raise TunelabError(f"{where}: {axis} has no values")
        levels.append([(axis, label, _options(opts or {}, f"{where}: {axis}: {label}"))
                       for label, opts in values.items()])
    rows = []
    for i, combo in enumerate(itertools.product(*levels), start=1):
        row: dict[str, Any] = {"id": i, "options": {}}
        for axis, label, opts in combo:
            row[axis] = label
            row["options"].update(opts)
        rows.append(row)
    return rows


def _normalize_rows(rows: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not rows:
        raise TunelabError(f"{where}: rows must be a non-empty list")
    out = [_normalize_row(row, f"{where}: rows[{i}]") for i, row in enumerate(rows)]
    for key in ("id", "name"):
        seen = [r[key] for r in out]
        dupes = sorted({str(v) for v in seen if seen.count(v) > 1})
        if dupes:
            raise TunelabError(f"{where}: rows: duplicate {key}s: {', '.join(dupes)}")
    return sorted(out, key=lambda r: r["id"])


def _normalize_row(row: Any, where: str) -> dict[str, Any]:
    row = _mapping(row, where)
    _check_keys(row, ROW_KEYS, where)
    rid = row.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 1:
        raise TunelabError(f"{where}: 'id' must be an integer >= 1 (0 is the base row)")
    from tunelab.methods import method_names

    options = _options(row.get("options") or {}, f"{where}: options")
    method = row.get("method", options.get("finetuning_type"))
    trainable = method_names(lambda m: m.trains)
    if method not in trainable:
        raise TunelabError(f"{where}: 'method' must be one of {', '.join(trainable)} (got {method!r})")
    if options.setdefault("finetuning_type", method) != method:
        raise TunelabError(f"{where}: method '{method}' disagrees with finetuning_type '{options['finetuning_type']}'")
    if not isinstance(row.get("aux", False), bool):
        raise TunelabError(f"{where}: 'aux' must be true or false")
    labels = {k: row[k] for k in LABELS if k in row}
    labels["method"] = method
    labels.setdefault("aux", False)
    name = str(row.get("name") or _default_name(labels))
    if not name.replace("_", "").replace("-", "").isalnum():
        raise TunelabError(f"{where}: name '{name}' must use letters, digits, '_' and '-' only (it names a directory)")
    return {"id": rid, "name": name, "labels": labels, "options": options}


def _default_name(labels: dict[str, Any]) -> str:
    parts = [str(labels[k]) for k in ("method", "weights", "layers", "variant") if labels.get(k) not in (None, "-", "")]
    return "_".join(parts + (["aux"] if labels.get("aux") else [])).replace(":", "").replace(" ", "")


# ---- scales, overrides, expansion ----

def apply_scale(spec: Spec, scale: str | None) -> Spec:
    """The spec with a named scale's overrides merged in (None = the spec's default_scale, if any)."""
    scale = scale or spec.default_scale
    if scale is None:
        return spec
    if scale not in spec.scales:
        valid = list(spec.scales) or ["(this spec defines no scales)"]
        raise TunelabError(f"unknown scale '{scale}': {closest(scale, valid)}")
    over = spec.scales[scale]
    sets = copy.deepcopy(spec.eval_sets)
    for name, cfg in (over.get("eval_sets") or {}).items():
        sets[name].update(cfg or {})
    return replace(spec, shared={**spec.shared, **over.get("shared", {})},
                   train={**spec.train, **over.get("train", {})}, eval={**spec.eval, **over.get("eval", {})},
                   eval_sets=sets, seeds=over.get("seeds", spec.seeds),
                   eval_every=over.get("eval_every", spec.eval_every))


def override_shared(spec: Spec, overrides: dict[str, Any]) -> Spec:
    """`--set key=value` from the command line: options for every stage of every row, and `seeds=[7]`,
    which replaces the spec's seed list at every scale (a rerun with other seeds, same everything else)."""
    overrides = dict(overrides)
    if "seeds" in overrides:
        seeds = _seeds(overrides.pop("seeds"), "--set seeds")
        scales = {name: {k: v for k, v in over.items() if k != "seeds"} for name, over in spec.scales.items()}
        spec = replace(spec, seeds=seeds, scales=scales)
    return replace(spec, shared={**spec.shared, **_options(overrides, "--set")})


def row_dir(row_id: int, name: str, seed: int) -> str:
    return f"rows/r{row_id:02d}_{name}_s{seed}"


def expand(spec: Spec, scale: str | None, study_dir: str | Path) -> list[RowPlan]:
    """Every (row, seed) of the spec at `scale` as a RowPlan; the base row (id 0) first, once."""
    spec = apply_scale(spec, scale)
    study_dir = Path(study_dir)
    plans = []
    if spec.base:
        plans.append(_plan(spec, study_dir, {"id": 0, "name": "base", "options": {"finetuning_type": "none"},
                                             "labels": {"method": "none", "weights": "-", "layers": "-", "aux": None}},
                           spec.seeds[0]))
    plans += [_plan(spec, study_dir, row, seed) for row in spec.rows for seed in spec.seeds]
    return plans


def _plan(spec: Spec, study_dir: Path, row: dict[str, Any], seed: int) -> RowPlan:
    rel = row_dir(row["id"], row["name"], seed)
    base = row["id"] == 0
    train = None
    if not base:
        dataset = row["options"].get("dataset", spec.train["dataset"])
        if row["labels"].get("aux"):
            dataset = f"{dataset},{spec.aux_dataset}"
        train = {**spec.shared, **spec.train, **row["options"], "dataset": dataset, "seed": seed,
                 "do_train": True, "output_dir": str(study_dir / rel / "train")}
        if train.get("report_to") not in (None, "none", [], ["none"]):  # trackers name each run after its row
            train.setdefault("run_name", Path(rel).name)
        if spec.eval_every:  # a checkpoint at every trajectory point, all kept
            train.update(save_strategy="steps", save_steps=spec.eval_every, save_total_limit=None)
    evals = {}
    for name, eval_set in spec.eval_sets.items():
        cfg = {**spec.shared, **spec.eval, **{k: v for k, v in eval_set.items() if k != "role"}}
        if base:
            cfg["finetuning_type"] = "none"
        else:
            cfg.update({k: train[k] for k in FORMAT_OPTIONS if k in train})
            cfg["checkpoint_dir"] = train["output_dir"]
        cfg.update(seed=seed, do_predict=True, predict_with_generate=True, output_dir=str(study_dir / rel / name))
        evals[name] = cfg
    return RowPlan(id=row["id"], name=row["name"], seed=seed, labels=dict(row["labels"]), dir=rel,
                   train=train, evals=evals, eval_every=spec.eval_every if train else None)


def eval_roles(spec: Spec) -> dict[str, str]:
    """Eval set name -> role (style / retention / other), for the report."""
    return {name: cfg["role"] for name, cfg in spec.eval_sets.items()}


def select_rows(plans: list[RowPlan], ids: list[int]) -> list[RowPlan]:
    """The plans of the given row ids, plus the base row (every report needs it)."""
    known = sorted({p.id for p in plans})
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise TunelabError(f"--rows: no row {', '.join(map(str, unknown))} in this study "
                           f"(rows: {known[0]}-{known[-1]})")
    return [p for p in plans if p.id in ids or p.id == 0]
