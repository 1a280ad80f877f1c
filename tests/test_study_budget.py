"""`tunelab study --budget` (tunelab/study/budget.py, sizing.py): durations, the size knobs and their floors,
the bisection on a synthetic estimate, and the command line on a tiny study with a fixed peak: the sizes
it chose in plan.json and the report, --dry_run, and a resumed study keeping them. No test measures time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_study_efficiency import fake_calibrate
from test_study_fakes import fake_run, tiny_spec_dict

from tunelab.errors import TunelabError
from tunelab.study import budget as bud
from tunelab.study import calibrate, runner
from tunelab.study.budget import Estimate, fit, parse_duration
from tunelab.study.spec import expand, parse_spec

REPO = Path(__file__).resolve().parents[1]


# ---- durations ----

@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("45min", 2700), ("1h", 3600), ("1h30m", 5400),
                                          ("90s", 90), ("2h5m10s", 7510), (" 1H ", 3600)])
def test_parse_duration_accepts_the_documented_forms(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(bud.duration_label(seconds)) == seconds  # the study dir's suffix reads back


@pytest.mark.parametrize("text", ["30", "1.5h", "-5m", "m", "half an hour", "30m1h", ""])
def test_parse_duration_refuses_anything_else_naming_the_forms(text):
    with pytest.raises(TunelabError, match="30m, 45min, 1h, 1h30m or 90s") as err:
        parse_duration(text)
    assert "\n" not in str(err.value)


def test_a_zero_budget_is_refused():
    with pytest.raises(TunelabError, match="longer than zero"):
        parse_duration("0m")


# ---- the size knobs ----

def _sized_spec(**over):
    sizes = {"train": {"dataset": "example", "max_samples": 64, "num_train_epochs": 1},
             "eval": {"max_new_tokens": 4, "max_generate_samples": 16},
             "eval_sets": {"persona": {"dataset": "example", "max_samples": 48},
                           "general": {"dataset": "alpaca_gpt4_en", "max_samples": 96}}}
    return parse_spec(tiny_spec_dict(**{**sizes, **over}))


def test_scaled_multiplies_every_knob_and_the_plans_carry_the_sizes(tmp_path):
    spec = bud.scaled(_sized_spec(), 0.5)
    assert bud.sizes(spec) == {"train": 32, "eval": {"persona": 24, "general": 48},
                               "generate": {"persona": 8, "general": 8}}
    lora = expand(spec, None, tmp_path)[1]
    assert lora.train["max_samples"] == 32
    assert [(c["max_samples"], c["max_generate_samples"]) for c in lora.evals.values()] == [(24, 8), (48, 8)]


def test_scaled_stops_at_the_floors_and_never_grows_a_knob():
    spec = _sized_spec(eval_sets={"persona": {"dataset": "example", "max_samples": 8},
                                  "general": {"dataset": "alpaca_gpt4_en", "max_samples": 96}})
    floors = bud.sizes(bud.scaled(spec, 0.01))
    assert floors == {"train": bud.FLOORS["train"], "eval": {"persona": 8, "general": bud.FLOORS["eval"]},
                      "generate": {"persona": bud.FLOORS["generate"], "general": bud.FLOORS["generate"]}}
    assert bud.sizes(bud.scaled(spec, 1.0)) == bud.sizes(spec)


def test_sizes_are_the_values_each_stage_sees():
    spec = parse_spec(tiny_spec_dict(shared={"dataset_dir": "data", "max_samples": 40},
                                     train={"dataset": "example"}, eval={"max_samples": 30},
                                     eval_sets={"persona": {"dataset": "example", "max_samples": 20},
                                                "general": {"dataset": "alpaca_gpt4_en"}}))
    assert bud.sizes(spec) == {"train": 40, "eval": {"persona": 20, "general": 30},
                               "generate": {"persona": None, "general": None}}
    unset = parse_spec(tiny_spec_dict(train={"dataset": "example"}))  # all rows: not scaled
    assert bud.sizes(bud.scaled(unset, 0.5))["train"] is None


def test_floor_factor_is_where_the_last_knob_reaches_its_floor():
    full = bud.sizes(_sized_spec())  # 64 train, 48 / 96 eval, 16 generated
    assert bud.floor_factor(full) == pytest.approx(min(16 / 64, 16 / 48, 16 / 96, 4 / 16))
    assert bud.shrink(full, bud.floor_factor(full)) == bud.shrink(full, 0.01)
    assert bud.floor_factor({"train": 16, "eval": {"a": 10}, "generate": {"a": None}}) == 1.0


# ---- the estimate and the fit ----

def test_row_seconds_at_the_mfu_given():
    """(each precision's expected MFU: tests/test_study_efficiency.py, efficiency.expected_mfu)"""
    flops = {"train": 1e12, "scoring": 0.0, "generation": 0.0}
    assert bud.row_seconds(flops, 0, 100, mfu=0.5) == pytest.approx(20.0)


def test_row_seconds_is_flops_at_the_expected_mfu_plus_the_stage_overhead():
    peak = 50.0
    flops = {"train": 6e9 * peak * bud.EXPECTED_MFU, "scoring": 3e9 * peak * bud.EXPECTED_MFU, "generation": 0.0}
    assert bud.row_seconds(flops, 3, peak) == pytest.approx(9 + 3 * bud.STAGE_OVERHEAD_S)
    assert Estimate({"a": 30.0, "b": 50.0}, devices=2).seconds == 40.0


class Linear:
    """A synthetic monotone estimate: row a takes 1000 s x factor, row b 500 s x factor."""

    def __init__(self):
        self.calls = []

    def __call__(self, factor: float) -> Estimate:
        self.calls.append(factor)
        return Estimate({"r01_a": 1000 * factor, "r02_b": 500 * factor})


def test_fit_finds_the_largest_factor_that_fits():
    estimate = Linear()
    factor, at = fit(estimate, 900, lowest=0.25)  # exact: 1500 x 0.6 = 900
    assert 0.6 - (1 - 0.25) / 2 ** bud.FIT_STEPS <= factor <= 0.6
    assert at.seconds == pytest.approx(1500 * factor) and at.seconds <= 900
    assert len(estimate.calls) == 2 + bud.FIT_STEPS


def test_fit_keeps_the_sizes_when_they_fit():
    estimate = Linear()
    assert fit(estimate, 1500, lowest=0.25)[0] == 1.0 and estimate.calls == [1.0]


def test_a_budget_below_the_floor_says_what_one_row_needs():
    with pytest.raises(TunelabError) as err:
        fit(Linear(), 100, lowest=0.25)  # at the floor: row a 250 s, both 375 s
    text = str(err.value)
    assert "\n" not in text and "--budget 1m40s is too short" in text
    assert "one row needs up to 4 min (r01_a)" in text and "the 2 rows 6 min" in text
    assert "larger --budget" in text and "--rows" in text


def test_the_description_names_the_sizes_and_the_estimate():
    record = {"seconds": 1800, "factor": 0.42, "estimated_seconds": 1690, "peak_gflops": 107.2, "precision": "fp32",
              "expected_mfu": 0.36,
              "sizes": {"train": 27, "eval": {"persona": 20, "general": 40}, "generate": {"persona": 7, "general": 7}}}
    assert bud.describe(record, "quick") == (
        "Sized by --budget 30m on this machine (fp32 peak 107 GFLOP/s, an expected 36% MFU): 0.42 x the quick "
        "scale: train 27 samples per data set, eval persona 20 / general 40 samples, 7 generated per set; "
        "estimated 28 min.")


# ---- the command line on a tiny study ----

PEAK = 1e-3  # GFLOP/s: a slow fake machine, so the tiny model's FLOPs, not the stage overhead, set the sizes


def _write_spec(tmp_path: Path, model: Path) -> Path:
    spec = tiny_spec_dict(
        shared={"dataset_dir": str(REPO / "data"), "model_name_or_path": str(model), "max_source_length": 64,
                "max_target_length": 32},
        train={"dataset": "alpaca_gpt4_en", "max_samples": 64, "num_train_epochs": 1},
        eval={"max_new_tokens": 4, "max_generate_samples": 16},
        eval_sets={"persona": {"dataset": "alpaca_gpt4_en", "max_samples": 48},
                   "general": {"dataset": "alpaca_gpt4_en", "max_samples": 32}})
    spec["rows"] = spec["rows"][:2]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _budget_between_the_ends(spec_path: Path, study_dir: Path) -> int:
    """A budget (s) between the estimates at the floor and at full size, from the planner itself."""
    from tunelab.study.sizing import Planner
    from tunelab.study.spec import load_spec

    settled = load_spec(spec_path)
    shape, tokenizer = calibrate.model_shape(settled.shared["model_name_or_path"])
    planner = Planner(settled, study_dir, None, 1, shape, tokenizer, PEAK)
    top, low = planner(1.0).seconds, planner(bud.floor_factor(planner.full)).seconds
    assert low < top
    return int((top + low) / 2)


def test_cli_budget_fits_records_the_sizes_and_a_resume_keeps_them(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from tunelab.study.cli import main

    monkeypatch.setattr(calibrate, "measure_peak", lambda precision, seconds=2.0: PEAK)
    monkeypatch.setattr(runner, "default_run_fn", fake_run)
    monkeypatch.setattr(runner, "default_calibrate", fake_calibrate)
    spec, out = _write_spec(tmp_path, tiny_llama_dir), tmp_path / "study"
    seconds = _budget_between_the_ends(spec, out)
    label = bud.duration_label(seconds)
    argv = [str(spec), "--output_dir", str(out), "--budget", label]

    assert main([*argv, "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert f"Sized by --budget {label}" in printed and "estimated" in printed and not out.exists()

    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    record = plan["budget"]
    assert record["seconds"] == seconds and 0 < record["factor"] < 1 and record["estimated_seconds"] <= seconds
    assert record["peak_gflops"] == PEAK and record["sizes"]["train"] < 64
    assert plan["rows"][1]["train"]["max_samples"] == record["sizes"]["train"]
    assert plan["rows"][1]["evals"]["general"]["max_samples"] == record["sizes"]["eval"]["general"]
    assert plan["scale_description"] == bud.describe(record, None)
    assert plan["scale_description"] in capsys.readouterr().out  # printed when fitted
    assert bud.describe_sizes(record["sizes"]) in (out / "report.md").read_text()

    # a resume never re-fits (a busier machine would pick other sizes): a fit here would fail
    monkeypatch.setattr(calibrate, "measure_peak", lambda *a, **k: pytest.fail("re-fitted on resume"))
    fingerprints = [r["fingerprint"] for r in plan["rows"]]
    assert main([str(out)]) == 0 and main(argv) == 0
    assert "not re-fitted" in capsys.readouterr().out
    assert [r["fingerprint"] for r in json.loads((out / "plan.json").read_text())["rows"]] == fingerprints
    with pytest.raises(TunelabError, match=f"was sized by --budget {label}.*resume it without --budget"):
        main([str(out), "--budget", "5m"])


def test_cli_budget_refusals_are_one_line(tmp_path, tiny_llama_dir, monkeypatch):
    from tunelab.study.cli import main

    monkeypatch.setattr(calibrate, "measure_peak", lambda precision, seconds=2.0: PEAK)
    monkeypatch.setattr(runner, "default_run_fn", fake_run)
    monkeypatch.setattr(runner, "default_calibrate", fake_calibrate)
    spec, out = _write_spec(tmp_path, tiny_llama_dir), tmp_path / "study"
    with pytest.raises(TunelabError, match="one row needs up to .* \\(rows/r0"):
        main([str(spec), "--output_dir", str(out), "--budget", "1s", "--dry_run"])
    with pytest.raises(TunelabError, match="the 2 rows"):  # --rows: the rows run now (and the base row)
        main([str(spec), "--output_dir", str(out), "--budget", "1s", "--rows", "2", "--dry_run"])
    with pytest.raises(TunelabError, match="30m, 45min"):
        main([str(spec), "--budget", "30", "--dry_run"])
    assert main([str(spec), "--output_dir", str(out)]) == 0  # a study without --budget ...
    with pytest.raises(TunelabError, match="started without --budget"):  # ... is not resized on resume
        main([str(out), "--budget", "30m"])


def test_a_row_is_planned_with_one_stage_call_for_training_and_one_for_its_eval_sets(tmp_path):
    from test_study_fakes import tiny_plans

    from tunelab.study.sizing import stage_calls

    _, plans = tiny_plans(tmp_path)
    assert [len(p.evals) for p in plans] == [2, 2, 2, 2]  # two eval sets each, run together (runner.run_evals)
    assert [stage_calls(p) for p in plans] == [1, 2, 2, 2]  # the base row only evaluates
