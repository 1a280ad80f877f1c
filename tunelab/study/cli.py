"""`tunelab study`: run a study spec and write its report, or rebuild the report of a study dir.

    tunelab study SPEC.yaml [--scale quick|full] [--output_dir DIR] [--workers N] [--devices cuda:0,cuda:1]
                            [--rows 0,1,5] [--set option=value ...] [--dry_run]
    tunelab study SPEC.yaml --executor slurm --partition gpu --rows_per_gpu 3 --time 4:00:00
    tunelab study SPEC.yaml --executor ray [--ray_address auto] [--gpus_per_row 1]
    tunelab study SPEC.yaml --budget 30m     # the scale shrunk to fit 30 min on this machine
    tunelab study STUDY_DIR                  # resume it with its own spec.yaml and scale
    tunelab study STUDY_DIR --report_only    # rebuild report.md / report.html / results.csv

The study dir defaults to runs/<name> for the spec's default scale and runs/<name>_<scale> for another
scale, so a quick and a full study never mix (and runs/<name>[_<scale>]_budget30m for --budget 30m: the
sizes it chose are in plan.json and the report, and a resumed study keeps them; tunelab/study/sizing.py). Exit code 0 when every row is done, 1 when some failed.
Executors (tunelab/study/executors.py) write the same row dirs, so any of them resumes any study.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.names import PLAN_FILE, SPEC_FILE
from tunelab.study import executors


def build_parser() -> argparse.ArgumentParser:
    from tunelab.cli import Parser

    p = Parser(prog="tunelab study", description="Run a grid of fine-tuning runs and write a report.")
    p.add_argument("spec", help="study spec (.yaml), or a study dir to resume / rebuild the report of")
    p.add_argument("--scale", help="named scale of the spec (quick, full); default: the spec's default_scale")
    p.add_argument("--output_dir", help="study dir (default runs/<name>, or runs/<name>_<scale> off the default scale)")
    p.add_argument("--workers", type=int, default=1, help="rows run in parallel processes (default 1)")
    p.add_argument("--devices", help="comma list of devices, one per worker (cuda:0,cuda:1); sets CUDA_VISIBLE_DEVICES")
    p.add_argument("--rows", help="comma list of row ids to run (the base row 0 always runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="OPTION=VALUE",
                   help="an option for every stage of every row, e.g. --set model_name_or_path=/models/x "
                        "or --set target_match=legacy (repeatable)")
    p.add_argument("--budget", help="fit the scale's sample counts to this time on this machine (30m, 45min, 1h, "
                                    "1h30m, 90s): the sizes chosen are printed and recorded in the report")
    p.add_argument("--dry_run", action="store_true", help="print the expanded plan and exit")
    p.add_argument("--report_only", action="store_true", help="only rebuild the report of a study dir")
    executors.add_arguments(p)
    return p


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-4', 'bf16=false'] -> {'lr': 0.0001, 'bf16': False} (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TunelabError(f"--set expects OPTION=VALUE, got '{item}'")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TunelabError(f"--rows expects a comma list of row ids, got '{text}'") from None


def load(ns: argparse.Namespace):
    """(spec, spec text, scale, study dir, overrides) from a spec file or a study dir."""
    from tunelab.study.budget import duration_label, parse_duration
    from tunelab.study.spec import load_spec

    path = Path(ns.spec)
    overrides = parse_overrides(ns.overrides)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise TunelabError(f"{path} is not a study dir (no {SPEC_FILE}): give a study spec .yaml")
        plan = read_plan(path)
        spec_file, study_dir = path / SPEC_FILE, path
        overrides = {**plan.get("set", {}), **overrides}
        scale = ns.scale or plan.get("scale")
    else:
        spec_file, study_dir, scale = path, None, ns.scale
    spec = load_spec(spec_file)
    scale = scale or spec.default_scale
    if study_dir is None:
        suffix = "" if scale in (None, spec.default_scale) else f"_{scale}"
        suffix += f"_budget{duration_label(parse_duration(ns.budget))}" if ns.budget else ""
        study_dir = Path(ns.output_dir or spec.output_dir or f"runs/{spec.name}{suffix}")
    elif ns.output_dir:
        study_dir = Path(ns.output_dir)
    return spec, spec_file.read_text(encoding="utf-8"), scale, study_dir, overrides


def read_plan(study_dir: Path) -> dict[str, Any]:
    """plan.json of a study dir ({} when there is none); an unreadable one is reported in one line."""
    path = study_dir / PLAN_FILE
    if not path.is_file():
        return {}
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        plan, reason = None, str(err)
    else:
        reason = "not a JSON object"
    if not isinstance(plan, dict):
        raise TunelabError(f"{path} is unreadable ({reason}): it records the study's scale and --set values; "
                           f"restore it, or restart from the spec: tunelab study {study_dir / SPEC_FILE} "
                           f"--output_dir {study_dir} [--scale ...] [--set ...] (finished rows are kept)")
    return plan


def validate_plans(plans) -> None:
    """Parse every stage's options now, so a bad value fails in seconds rather than hours into the study."""
    from tunelab.hparams import parse_args

    for plan in plans:
        for stage, cfg in plan.stages():
            try:
                parse_args(config=cfg)
            except (TunelabError, ValueError) as err:
                raise TunelabError(f"{plan.dir} {stage}: {err}") from None


def print_plan(plans, study_dir: Path, scale: str | None) -> None:
    print(f"study dir {study_dir}, scale {scale or '-'}: {len(plans)} rows")
    for p in plans:
        labels = " ".join(f"{k}={v}" for k, v in p.labels.items())
        train = p.train or {}
        keys = ("dataset", "finetuning_type", "lora_target", "target_layers", "num_layer_trainable",
                "name_module_trainable", "pre_seq_len", "max_samples", "num_train_epochs", "learning_rate")
        opts = " ".join(f"{k}={train[k]}" for k in keys if k in train)
        evals = ", ".join(f"{n}:{c['dataset']}[{c.get('max_samples', 'all')}]" for n, c in p.evals.items())
        print(f"  r{p.id:02d} s{p.seed} {p.name:<24} {labels}")
        print(f"      train: {opts or '(none: base model)'}\n      eval: {evals}")


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    if ns.report_only:
        return _report(Path(ns.spec))
    from tunelab.study import runner, sizing
    from tunelab.study.results import check_measures
    from tunelab.study.spec import eval_roles, expand, override_shared, select_rows

    spec, text, scale, study_dir, overrides = load(ns)
    spec = override_shared(spec, overrides) if overrides else spec
    recorded = read_plan(study_dir) if ns.budget or Path(ns.spec).is_dir() else {}
    devices = len({d.strip() for d in ns.devices.split(",")}) if ns.devices else 1
    sized, at_scale, budget = sizing.resolve(ns.budget, spec, scale, study_dir, recorded,
                                             _parse_ids(ns.rows) if ns.rows else None, devices, ns.executor)
    all_plans = expand(sized, at_scale, study_dir)  # plan.json and the report cover every row, run now or not
    plans = select_rows(all_plans, _parse_ids(ns.rows)) if ns.rows else all_plans
    validate_plans(plans)
    executor = executors.from_args(ns, study_dir)  # bad executor options fail before anything runs
    if ns.dry_run:
        print_plan(plans, study_dir, scale)
        return 0
    runner.check_resumable(all_plans, study_dir)  # before plan.json of an earlier study is overwritten
    check_measures(study_dir, [p.dir for p in all_plans], eval_roles(spec), spec.decide_on)
    runner.write_plan(study_dir, all_plans, _meta(spec, scale, overrides, budget), text if Path(ns.spec).is_file() else None)
    try:
        records = runner.run_study(plans, study_dir, executor=executor)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (tunelab/signals.py): the running row is marked
        print(f"\ninterrupted: `tunelab study {study_dir}` continues where it stopped", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    paths = _write_report(study_dir)
    print(f"report: {paths['html']}")
    failed = [r.get("dir") for r in records if r.get("status") != "done"]
    if failed:
        print(f"{len(failed)} rows not done: {', '.join(failed)} (rerun the same command to retry them)")
    return 1 if failed else 0


def _meta(spec, scale: str | None, overrides: dict[str, Any], budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """What plan.json records besides the rows: enough to resume (scale, --set, --budget's sizes) and to
    title the report."""
    from tunelab.study.budget import describe
    from tunelab.study.spec import eval_roles

    description = (spec.scales.get(scale) or {}).get("description", "") if scale else ""
    return {"name": spec.name, "description": spec.description, "scale": scale,
            "scale_description": describe(budget, scale) if budget else description,
            "eval_sets": eval_roles(spec), "set": overrides, "decide_on": spec.decide_on,
            "model": spec.shared.get("model_name_or_path") or "default (SmolLM2-135M-Instruct)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"budget": budget} if budget else {})}


def _write_report(study_dir: Path) -> dict[str, Path]:
    from tunelab.study.report import build_report

    return build_report(study_dir)


def _report(study_dir: Path) -> int:
    if not (study_dir / PLAN_FILE).is_file():
        raise TunelabError(f"--report_only needs a study dir with {PLAN_FILE}, got {study_dir}")
    read_plan(study_dir)  # an unreadable plan.json: one line saying so
    paths = _write_report(study_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
