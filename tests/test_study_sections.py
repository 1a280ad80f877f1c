"""Report sections from fixture files (tunelab/study/forgotten.py, sections.py, figures.trajectories):
what each row forgot, the trajectory figure, the efficiency section; and a study without the new files
still builds its report without them."""

from __future__ import annotations

import json
from pathlib import Path

from test_study_efficiency import fake_calibrate
from test_study_fakes import fake_run, tiny_plans
from test_study_trajectory import trajectory_run, write_likelihood

from tunelab.study.forgotten import most_forgotten, read_predictions
from tunelab.study.report import build_report
from tunelab.study.runner import run_study


def _quiet(_line: str) -> None:
    pass


def _predictions(out: Path, answers: dict[int, str], with_index: bool = True) -> None:
    lines = [json.dumps({**({"index": i} if with_index else {}), "prompt": f"question {i}", "predict": a,
                         "label": f"reference {i}"}) for i, a in answers.items()]
    (out / "generated_predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_most_forgotten_ranks_nll_rises_and_pairs_answers_by_index():
    base = {i: {"nll": 1.0} for i in range(6)}
    row = {0: {"nll": 1.1}, 1: {"nll": 3.0}, 2: {"nll": 0.5}, 3: {"nll": 2.0}, 4: {"nll": 1.0}, 5: {"nll": None}}
    base_preds = {1: {"prompt": "p1", "label": "l1", "predict": "base says"}, 3: {"prompt": "p3", "label": "l3",
                                                                                  "predict": "base 3"}}
    row_preds = {1: {"prompt": "p1", "label": "l1", "predict": "row says"}}
    top = most_forgotten(base, row, base_preds, row_preds, top=2)
    assert [(s.index, round(s.rise, 6)) for s in top] == [(1, 2.0), (3, 1.0)]
    assert (top[0].prompt, top[0].reference, top[0].base_answer, top[0].row_answer) == ("p1", "l1", "base says",
                                                                                         "row says")
    assert (top[1].prompt, top[1].row_answer) == ("p3", None)  # only the base answer was generated
    assert most_forgotten(base, base, {}, {}) == []  # the base against itself forgets nothing


def test_predictions_without_index_are_in_sample_order(tmp_path):
    _predictions(tmp_path, {0: "x", 1: "y"}, with_index=False)
    assert read_predictions(tmp_path / "generated_predictions.jsonl")[1]["predict"] == "y"
    assert read_predictions(tmp_path / "missing.jsonl") == {}


def test_report_shows_trajectories_forgotten_samples_and_efficiency(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=1)
    run_study(plans, tmp_path, run_fn=trajectory_run, log=_quiet, calibrate=fake_calibrate)
    base, row = (tmp_path / plans[i].dir / "general" for i in (0, 1))
    write_likelihood(base, [1.0, 1.0, 1.0])
    write_likelihood(row, [1.2, 2.5, 0.9])  # sample 1 forgotten most, sample 2 became more likely
    _predictions(base, {0: "base zero", 1: "base one"})
    _predictions(row, {0: "row zero", 1: "row one"})
    build_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert 'alt="Style vs retention along training"' in page and (tmp_path / "figures/trajectories.png").is_file()
    assert page.index("Style learned vs knowledge kept") < page.index("Style vs retention along training")
    assert "<h2>What was forgotten</h2>" in page and page.count("<details>") == 3  # one per trained row
    forgotten = page[page.index("<details><summary>r1 lora_qkv"):]
    forgotten = forgotten[:forgotten.index("</details>")]
    assert "top 2 of 3 general samples, largest rise +1.500" in forgotten
    assert forgotten.index("question 1") < forgotten.index("question 0")
    assert "base one" in forgotten and "row one" in forgotten and "+1.500" in forgotten
    assert "<h2>Efficiency</h2>" in page and "study MFU" in page
    assert "likelihood scoring (s)" in page and "r01_lora_qkv_s42" in page
    md = (tmp_path / "report.md").read_text()
    assert "**r1 lora_qkv (seed 42): top 2 of 3 general samples" in md and "## Efficiency" in md


def _older_run(args):
    """fake_run as a tunelab before per-sample likelihood files: no likelihood.jsonl."""
    metrics = fake_run(args)
    (Path(args.training.output_dir) / "likelihood.jsonl").unlink(missing_ok=True)
    return metrics


def test_an_older_study_without_the_new_files_still_reports(tmp_path):
    _, plans = tiny_plans(tmp_path)
    run_study(plans, tmp_path, run_fn=_older_run, log=_quiet)  # no likelihood files, no calibration
    build_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "What was forgotten" not in page and "along training" not in page
    assert "<h2>Efficiency</h2>" in page and "MFU unknown" in page  # the time split is still there
