"""The study report from fixture run dirs (small JSON files written here): table values, derived
columns, seeds as mean ± spread with not-significant marking, figures, a self-contained HTML file,
and the four conclusion checks on crafted numbers (supported / not supported / inconclusive), on
point estimates and on per-sample data (margin CIs); per-sample likelihood files (the contract's
likelihood.jsonl) and reports with and without them."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from test_study_fakes import METRICS, tiny_plans, write_predict_files, write_train_files

from tunelab.errors import TunelabError
from tunelab.study import conclusions as C
from tunelab.study.cli import main as study_main
from tunelab.study.report import build_report
from tunelab.study.results import (Paired, RunResult, Study, aggregate, check_measures, load_reference,
                                   paired_difference, read_likelihood, read_study)
from tunelab.study.runner import _write_json


def _finish(study_dir, plan, persona: float, general: float, status: str = "done") -> None:
    """Write a finished row: every metric of a set equal to one number, so set means are exact."""
    row_dir = study_dir / plan.dir
    if plan.train:
        write_train_files(row_dir / "train", plan.train["finetuning_type"], trainable=1000 + plan.id)
    if status == "done":
        write_predict_files(row_dir / "persona", dict.fromkeys(METRICS, persona))
        write_predict_files(row_dir / "general", dict.fromkeys(METRICS, general))
    _write_json(row_dir / "row.json", {"status": status, "error": "ValueError: boom" if status == "failed" else None})


@pytest.fixture
def study_dir(tmp_path):
    """Base (persona 10, general 30) and three rows; row 3 failed."""
    _, plans = tiny_plans(tmp_path)
    statuses = ("done", "done", "done", "failed")
    for plan, persona, general, status in zip(plans, (10, 14, 12, 0), (30, 20, 29, 0), statuses):
        _finish(tmp_path, plan, persona, general, status)
    return tmp_path


def test_table_values_and_derived_columns(study_dir):
    study = read_study(study_dir)
    lora = study.row(1)
    assert lora.mean["persona_bleu-4"] == 14 and lora.mean["trainable_params"] == 1001
    assert lora.mean["style_gain"] == pytest.approx(4.0) and lora.mean["retention"] == pytest.approx(-10.0)
    assert lora.mean["general_rouge-l_delta"] == pytest.approx(-10.0)
    assert study.row(3).status == "failed" and "style_gain" not in study.row(3).mean
    build_report(study_dir)
    md = (study_dir / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| 1 |"))
    assert "| lora | qkv | last1 | no | 1,001 | 1.6750 |" in line and "| +4.00 | -10.00 | done |" in line
    assert "[persona](rows/r01_lora_qkv_s42/persona/generated_predictions.jsonl)" in line
    assert "ValueError: boom" in md  # failed rows listed with their error


def test_results_csv_has_a_line_per_run_with_derived_columns(study_dir):
    build_report(study_dir)
    rows = list(csv.DictReader((study_dir / "results.csv").open()))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert float(rows[2]["retention"]) == pytest.approx(-1.0) and rows[3]["status"] == "failed"
    assert rows[1]["persona_predictions"] == "rows/r01_lora_qkv_s42/persona/generated_predictions.jsonl"


def test_figures_exist_and_html_is_self_contained(study_dir):
    paths = build_report(study_dir)
    for name in ("loss_curves", "style_vs_retention"):
        assert (study_dir / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"https?://", page), "no external URL"
    assert not re.search(r"<(link|script)\b", page)
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert 'href="rows/r01_lora_qkv_s42/persona/generated_predictions.jsonl"' in page
    assert "not comparable in absolute terms" in page and "Calibration" in page


def test_report_only_from_the_command_line(study_dir, capsys):
    assert study_main([str(study_dir), "--report-only"]) == 0
    assert (study_dir / "report.html").is_file() and "html:" in capsys.readouterr().out


def test_seeds_give_mean_spread_and_not_significant_marks(tmp_path):
    _, plans = tiny_plans(tmp_path, seeds=[1, 2])
    # plans: base, r1 s1, r1 s2, r2 s1, r2 s2, r3 s1, r3 s2. Base persona 10.
    values = {1: [(10.5, 30), (9.7, 30)], 2: [(16, 25), (18, 27)], 3: [(10, 30), (10, 30)]}
    _finish(tmp_path, plans[0], 10, 30)
    seen: dict[int, int] = {}
    for plan in plans[1:]:
        persona, general = values[plan.id][seen.setdefault(plan.id, 0)]
        seen[plan.id] += 1
        _finish(tmp_path, plan, persona, general)
    study = read_study(tmp_path)
    r1, r2 = study.row(1), study.row(2)
    assert r1.mean["style_gain"] == pytest.approx(0.1) and r1.spread["style_gain"] == pytest.approx(0.5657, abs=1e-3)
    assert r1.not_significant("style_gain") is True       # 0.1 < 0.57: within the seed spread
    assert r2.not_significant("style_gain") is False      # 7 > 1.41
    assert r2.not_significant("retention") is False       # -4 vs 1.41
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| 1 |"))
    assert "+0.10 ± 0.57 (n.s.)" in line
    assert "+7.00 ± 1.41 |" in next(l for l in md.splitlines() if l.startswith("| 2 |"))
    assert "standard deviation" in md


def test_one_seed_noise_is_the_eval_sample_standard_error(tmp_path):
    from tunelab.metrics import score_pair

    labels = ["the cat sat on the mat", "a quick brown fox", "green eggs and ham", "to be or not to be"]
    base_preds = ["zzz"] * 4
    good_preds = [labels[0], "zzz", labels[2], "zzz"]  # right on half the samples
    _, plans = tiny_plans(tmp_path)
    for plan in plans:
        preds = base_preds if plan.id in (0, 2) else good_preds
        if plan.train:
            write_train_files(tmp_path / plan.dir / "train")
        for name, value in (("persona", 10 if plan.id in (0, 2) else 40), ("general", 30)):
            write_predict_files(tmp_path / plan.dir / name, dict.fromkeys(METRICS, value), list(zip(preds, labels)))
        _write_json(tmp_path / plan.dir / "row.json", {"status": "done"})
    study = read_study(tmp_path)

    def mean4(pred, label):
        return sum(score_pair(pred, label).values()) / 4

    diffs = [mean4(g, l) - mean4(b, l) for g, b, l in zip(good_preds, base_preds, labels)]
    expected = (sum((d - sum(diffs) / 4) ** 2 for d in diffs) / 3) ** 0.5 / 2
    assert study.row(1).noise("style_gain") == pytest.approx(expected) and expected > 10
    assert study.row(1).not_significant("style_gain") is False     # +30 > its standard error
    assert study.row(2).noise("style_gain") == 0.0                  # same answers as the base: no noise
    assert study.row(1).not_significant("retention") is True        # 0 change, within the noise


# ---- conclusions on crafted numbers ----

def _study(rows, seeds_spread: float | None = None):
    """rows: (id, method, weights, layers, aux, style_gain, retention). Base style 10, general 30.
    With seeds_spread, each row gets two seeds at value ± spread/sqrt(2) (sample std = spread)."""
    runs = [_run(0, {"method": "none", "aux": None}, 10, 30, 0)]
    for row_id, method, weights, layers, aux, gain, ret in rows:
        labels = {"method": method, "weights": weights, "layers": layers, "aux": aux}
        if seeds_spread is None:
            runs.append(_run(row_id, labels, 10 + gain, 30 + ret, 0))
        else:
            d = seeds_spread / 2 ** 0.5
            runs += [_run(row_id, labels, 10 + gain + s * d, 30 + ret + s * d, i) for i, s in enumerate((-1, 1))]
    roles = {"persona": "style", "general": "retention"}
    return Study(name="t", scale=None, roles=roles, rows=aggregate(runs, roles))


def _run(row_id, labels, persona, general, seed):
    run = RunResult(id=row_id, name=f"r{row_id}", seed=seed, labels=labels, dir="", status="done")
    run.values = {**{f"persona_{m}": persona for m in METRICS}, **{f"general_{m}": general for m in METRICS}}
    return run


# a study shaped like the 2023 findings: (id, method, weights, layers, aux, style gain, retention)
LIKE_2023 = [
    (1, "freeze", "mlp", "last3", False, 1.0, -6), (2, "freeze", "mlp", "last3", True, 1.5, -4),
    (3, "freeze", "mlp", "first3", False, 0.7, -15), (4, "freeze", "mlp", "first3", True, 0.5, -12),
    (9, "p_tuning", "prefix", "all", False, 0.1, 0.5), (10, "p_tuning", "prefix", "all", True, 0.2, 0.8),
    (11, "lora", "mlp", "last3", False, 1.2, -10), (12, "lora", "mlp", "last3", True, 1.1, -3),
    (17, "lora", "qkv", "last3", False, 1.4, -9), (18, "lora", "qkv", "last3", True, 1.6, -1),
    (13, "lora", "qkv", "first3", False, 1.3, -12), (14, "lora", "qkv", "first3", True, 1.2, -5),
]


def _verdicts(rows, spread=None):
    return {v.key: v.verdict for v in C.check_conclusions(_study(rows, spread))}


def test_conclusions_supported_on_a_2023_like_study():
    assert _verdicts(LIKE_2023) == {"a": "supported", "b": "supported", "c": "supported", "d": "supported"}


def test_conclusions_not_supported_when_the_numbers_say_otherwise():
    rows = [list(r) for r in LIKE_2023]
    for r in rows:
        if r[0] in (3, 4):
            r[6] = -2          # freeze-first keeps knowledge -> (a) fails
        if r[0] in (9, 10):
            r[5] = 3.0         # p_tuning learns the most style -> (b) fails
        if r[1] == "lora" and r[4]:
            r[6] -= 8          # aux no longer helps LoRA -> (c) fails
        if r[0] == 2:
            r[5], r[6] = 2.5, 0.0  # a Freeze row beats every LoRA qkv last3 row -> (d) fails
    assert _verdicts([tuple(r) for r in rows]) == {"a": "not supported", "b": "not supported",
                                                   "c": "not supported", "d": "not supported"}


def _sample_study(rows, sd: float, n: int = 40, seed: int = 0) -> Study:
    """_study's rows with per-sample NLL differences: each row's style gain / retention are `n` samples
    of value + N(0, sd), paired tables built as read_study builds them."""
    study = _study(rows)
    rng = np.random.default_rng(seed)
    for column, col in (("style_gain_nll", 5), ("retention_nll", 6)):
        table = Paired(column=column, eval_set="persona" if column.startswith("style") else "general",
                       index=list(range(n)), diffs={0: np.zeros(n)})
        for r in rows:
            table.diffs[r[0]] = r[col] / 10 + rng.normal(0.0, sd, n)  # nats: a tenth of the score scale
            study.row(r[0]).mean[column] = float(table.diffs[r[0]].mean())
        study.paired[column] = table
    return study


NLL = {"style": "nll", "retention": "nll"}


def test_verdicts_follow_the_margin_ci_on_per_sample_data():
    verdicts = C.check_conclusions(_sample_study(LIKE_2023, sd=0.05), NLL)
    assert {v.key: v.verdict for v in verdicts} == {"a": "supported", "b": "supported", "c": "supported",
                                                     "d": "supported"}
    a = verdicts[0]
    assert a.lo > 0 and a.lo <= a.margin <= a.hi and f"[{a.lo:+.3f}, {a.hi:+.3f}]" in a.margin_text()
    assert a.measures == "NLL" and "margin +" in a.figures[-1]


def test_a_gap_within_the_sample_noise_is_inconclusive_with_its_ci():
    # freeze-first at -12.5 (-1.25 nats) is 0.4 nats below the next-lowest group (lora-first, -0.85); per-sample
    # noise of sd 2 over 40 samples makes that gap noise, sd 0.05 does not
    close = [r[:6] + (-12.5,) if r[0] in (3, 4) else r for r in LIKE_2023]
    noisy = C.check_freeze_first(C.measured(_sample_study(close, sd=2.0), NLL))
    assert noisy.verdict == "inconclusive" and noisy.lo < 0 < noisy.hi and "[" in noisy.margin_text()
    assert C.check_freeze_first(C.measured(_sample_study(close, sd=0.05), NLL)).verdict == "supported"
    assert C.check_freeze_first(_study(close)).verdict == "supported"  # no per-sample data: point estimates
    assert "point estimate, no CI" in C.check_freeze_first(_study(close)).margin_text()


def test_verdicts_not_supported_when_the_ci_lies_below_zero():
    rows = [r[:6] + (-2,) if r[0] in (3, 4) else r for r in LIKE_2023]   # freeze-first keeps knowledge
    rows = [r[:5] + (3.0, r[6]) if r[0] in (9, 10) else r for r in rows]  # p_tuning learns the most style
    got = {v.key: v for v in C.check_conclusions(_sample_study(rows, sd=0.05), NLL)}
    assert got["a"].verdict == "not supported" and got["a"].hi < 0
    assert got["b"].verdict == "not supported" and "learns little style" in got["b"].figures[1]


def test_base_row_against_itself_is_zero_with_a_zero_interval(tmp_path):
    _sample_files(tmp_path)
    study = read_study(tmp_path)
    base = study.row(0)
    for column in ("style_gain_nll", "retention_nll", "style_kl", "retention_kl"):
        assert base.mean[column] == 0.0 and base.ci[column] == (0.0, 0.0)


def test_conclusions_need_their_rows():
    only_lora = [r for r in LIKE_2023 if r[1] == "lora"]
    verdicts = C.check_conclusions(_study(only_lora))
    assert [v.verdict for v in verdicts[:2]] == ["inconclusive", "inconclusive"]
    assert "needs" in verdicts[0].figures[0]


def test_the_published_2023_numbers_calibrate_the_checks():
    meta, reference = load_reference()
    assert len(reference.rows) == 23 and "ChatNVL" in meta["source"]
    assert reference.row(18).labels["layers"] == "last3" and reference.row(18).labels["weights"] == "qkv"
    verdicts = {v.key: v.verdict for v in C.check_conclusions(reference)}
    # (a)-(c) hold on the published table; (d) does not by a symmetric trade-off: row 14 (LoRA mlp on
    # "layers 0-2", really 9 layers, with aux) learns more style at similar retention than row 18.
    assert verdicts == {"a": "supported", "b": "supported", "c": "supported", "d": "not supported"}
    d = C.check_qkv_last3(reference)
    assert "r14" in d.figures[0] and "on the Pareto front" in d.figures[1]


def test_the_reference_table_ships_with_the_package():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"].get("package-data", {})
    assert "reference/*.json" in package_data.get("tunelab.study", []), \
        'pyproject.toml needs [tool.setuptools.package-data] "tunelab.study" = ["reference/*.json"]'


# ---- per-sample files (likelihood.jsonl, indexed predictions) ----

def _sample_files(study_dir, n: int = 30, decide_on=None):
    """tiny_plans rows with per-sample NLL / KL on both sets: row r's NLL is the base's minus a known
    shift plus noise, so style gain (nll) and retention (nll) have known means."""
    meta = {} if decide_on is None else {"decide_on": decide_on}
    _, plans = tiny_plans(study_dir)
    if meta:
        plan = json.loads((study_dir / "plan.json").read_text())
        _write_json(study_dir / "plan.json", {**plan, **meta})
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, n)
    shifts = {0: (0.0, 0.0), 1: (0.3, -0.2), 2: (0.1, -0.4), 3: (0.05, 0.0)}  # (style gain, retention)
    for plan in plans:
        row_dir = study_dir / plan.dir
        if plan.train:
            write_train_files(row_dir / "train", plan.train["finetuning_type"])
        noise = rng.normal(0.0, 0.05, n) if plan.id else np.zeros(n)
        for name, shift in zip(("persona", "general"), shifts[plan.id]):
            write_predict_files(row_dir / name, dict.fromkeys(METRICS, 10 + shift), nll=list(base - shift + noise),
                                kl=[abs(shift)] * n)
        _write_json(row_dir / "row.json", {"status": "done"})
    return plans


def test_likelihood_columns_with_intervals_in_the_tables_and_the_csv(tmp_path):
    _sample_files(tmp_path)
    study = read_study(tmp_path)
    r1 = study.row(1)
    assert r1.mean["style_gain_nll"] == pytest.approx(0.3, abs=0.03)
    assert r1.mean["retention_nll"] == pytest.approx(-0.2, abs=0.03)
    assert r1.mean["retention_kl"] == pytest.approx(-0.2) and r1.mean["style_kl"] == pytest.approx(0.3)
    lo, hi = r1.ci["style_gain_nll"]
    assert lo < r1.mean["style_gain_nll"] < hi and hi - lo < 0.1
    assert r1.mean["persona_nll"] == pytest.approx(study.row(0).mean["persona_nll"] - 0.3, abs=0.03)
    paths = build_report(tmp_path)
    md = paths["md"].read_text()
    assert "style gain (nll)" in md and "retention (-kl)" in md and "paired bootstrap" in md
    line = next(l for l in md.splitlines() if l.startswith("| 1 |"))
    assert f"{r1.mean['style_gain_nll']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in line
    assert "verdict (NLL)" in md and "verdict (BLEU/ROUGE)" in md  # decide_on default, the 2023 reading beside
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert float(rows[1]["style_gain_nll_lo"]) == pytest.approx(lo, abs=1e-6)
    assert rows[0]["retention_nll_hi"] == "0.0" and "retention_kl" in rows[1]


def test_decide_on_from_the_plan_chooses_the_verdict_measures(tmp_path):
    _sample_files(tmp_path, decide_on={"style": "nll", "retention": "kl"})
    md = build_report(tmp_path)["md"].read_text()
    assert "verdict (style NLL, retention KL)" in md and "Decided on style NLL, retention KL: paired bootstrap" in md


def test_a_study_without_likelihood_files_reports_bleu_rouge_verdicts_saying_why(study_dir):
    md = build_report(study_dir)["md"].read_text()
    assert "Verdicts on BLEU/ROUGE only: decide_on style: nll needs style_gain_nll" in md
    assert "verdict (BLEU/ROUGE)" in md and "verdict (NLL)" not in md and "style gain (nll)" not in md
    assert study_main([str(study_dir), "--report-only"]) == 0


def test_likelihood_files_pair_by_index_or_by_line_order(tmp_path):
    lines = [{"index": 4, "tokens": 3, "nll": 1.5, "kl": None}, {"index": 9, "tokens": 2, "nll": 2.0, "kl": None},
             {"index": 11, "tokens": 0, "nll": None, "kl": None}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    assert read_likelihood(tmp_path / "a.jsonl") == {"nll": {4: 1.5, 9: 2.0}}  # kl null: no kl; no tokens: no nll
    (tmp_path / "b.jsonl").write_text('{"nll": 1.0, "kl": 0.5}\n{"nll": 3.0, "kl": 0.0}\n')
    assert read_likelihood(tmp_path / "b.jsonl") == {"nll": {0: 1.0, 1: 3.0}, "kl": {0: 0.5, 1: 0.0}}
    # a generated subset pairs on its indices; other references on one index are not the same samples
    assert paired_difference({4: 3.0, 9: 1.0}, {0: 0.0, 4: 1.0, 9: 2.0}, 1) == {4: 2.0, 9: -1.0}
    assert paired_difference({4: 3.0}, {4: 1.0}, -1, {4: "x"}, {4: "y"}) is None


def test_bleu_rouge_intervals_pair_the_generated_subset_by_index(tmp_path):
    pytest.importorskip("jieba")
    labels = ["the cat sat on the mat", "a quick brown fox", "green eggs and ham", "to be or not to be"]
    _, plans = tiny_plans(tmp_path)
    for plan in plans:
        preds = labels if plan.id == 1 else ["zzz"] * 4
        pairs = list(zip(preds, labels))
        if plan.train:
            write_train_files(tmp_path / plan.dir / "train")
        for name in ("persona", "general"):
            write_predict_files(tmp_path / plan.dir / name, dict.fromkeys(METRICS, 10), pairs)
        _write_json(tmp_path / plan.dir / "row.json", {"status": "done"})
    study = read_study(tmp_path)
    assert study.paired["style_gain"].index == [0, 1, 2, 3]
    lo, hi = study.row(1).ci["style_gain"]
    assert 0 < lo <= hi and study.row(2).ci["style_gain"] == (0.0, 0.0)


def test_a_running_study_refuses_rows_scored_without_the_decide_on_measures(study_dir):
    dirs = [f"rows/{p.parent.name}" for p in sorted(study_dir.glob("rows/*/row.json"))]
    roles = {"persona": "style", "general": "retention"}
    with pytest.raises(TunelabError, match=r"decide_on: style: nll needs per-sample nll .* valid for this "
                                           r"study dir: bleu_rouge;"):
        check_measures(study_dir, dirs, roles, {"style": "nll", "retention": "nll"})
    check_measures(study_dir, dirs, roles, {"style": "bleu_rouge", "retention": "bleu_rouge"})
