"""The study runner with a fake run_fn (tests/test_study_fakes.py): resume after a kill redoes nothing
finished, a failing row is recorded and the others finish, the base row is evaluated once, a
half-finished training stage resumes from its checkpoint, parallel workers run every row once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_study_efficiency import fake_calibrate
from test_study_fakes import FailingRun, JointRun, fake_run, read_calls, tiny_plans

from tunelab import integrity
from tunelab.hparams import TunelabError
from tunelab.study import runner
from tunelab.study.runner import read_row, run_study

REPO = Path(__file__).resolve().parents[1]
STAGES_PER_STUDY = 2 + 3 * 3  # base: 2 evals; 3 trained rows: train + 2 evals


def _quiet(_line: str) -> None:
    pass


def test_a_study_runs_every_stage_once_and_records_each_row(tmp_path):
    _, plans = tiny_plans(tmp_path)
    records = run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    assert [r["status"] for r in records] == ["done"] * 4
    calls = read_calls(tmp_path)
    assert len(calls) == STAGES_PER_STUDY
    lora = json.loads((tmp_path / "rows/r01_lora_qkv_s42/row.json").read_text())
    assert set(lora["stages"]) == {"train", "persona", "general"} and lora["seconds"] >= 0
    assert lora["stages"]["train"]["metrics"]["train_loss"] == pytest.approx(1.675)
    # evals of a trained row load its checkpoint; the method comes from the checkpoint, not from flags
    evals = [c for c in calls if c["stage"].startswith("rows/r01") and not c["stage"].endswith("train")]
    assert all(c["checkpoint_dir"].endswith("rows/r01_lora_qkv_s42/train") for c in evals)


def test_a_run_fn_with_evals_gets_each_rows_eval_stages_in_one_call(tmp_path):
    """Training alone, then both eval sets in one call; each stage's seconds are the call's time shared by the
    stages' own runtimes (1 : 3), and row.json names the stage each ran with. A row stopped during that call
    redoes both; a row with one eval set left runs it alone."""
    _, plans = tiny_plans(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_study(plans, tmp_path, run_fn=JointRun(match="r02_"), log=_quiet)
    calls = read_calls(tmp_path)
    assert [c["stage"] for c in calls] == ["evals", "rows/r01_lora_qkv_s42/train", "evals",
                                           "rows/r02_freeze_mlp_aux_s42/train", "evals"]
    assert calls[2]["stages"] == ["rows/r01_lora_qkv_s42/persona", "rows/r01_lora_qkv_s42/general"]
    row = read_row(tmp_path / plans[1].dir)
    persona, general = row["stages"]["persona"], row["stages"]["general"]
    assert persona["run_with"] == ["general"] and general["run_with"] == ["persona"]
    assert general["seconds"] == pytest.approx(3 * persona["seconds"], abs=0.1)
    assert read_row(tmp_path / plans[2].dir)["stages"]["persona"]["status"] == "interrupted"
    fake_run(runner._parse(plans[2].evals["persona"]))  # say row 2's persona set had finished after all
    calls = read_calls(tmp_path)
    run_study(plans, tmp_path, run_fn=JointRun(), log=_quiet)
    later = [c["stage"] for c in read_calls(tmp_path)[len(calls):]]
    assert later == ["rows/r02_freeze_mlp_aux_s42/general", "rows/r03_p_tuning_s42/train", "evals"]
    assert all(read_row(tmp_path / p.dir)["status"] == "done" for p in plans)


def test_the_base_row_is_evaluated_once_and_never_trained(tmp_path):
    _, plans = tiny_plans(tmp_path, seeds=[1, 2])
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    base = [c for c in read_calls(tmp_path) if c["stage"].startswith("rows/r00_base")]
    assert sorted(c["stage"] for c in base) == ["rows/r00_base_s1/general", "rows/r00_base_s1/persona"]
    assert all(c["finetuning_type"] == "none" and c["checkpoint_dir"] is None for c in base)
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)  # a rerun does not redo it either
    assert len([c for c in read_calls(tmp_path) if c["stage"].startswith("rows/r00")]) == 2


def test_resume_after_a_kill_redoes_nothing_finished(tmp_path):
    _, plans = tiny_plans(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during row 2's training
        run_study(plans, tmp_path, run_fn=FailingRun("r02_freeze_mlp_aux_s42/train", KeyboardInterrupt), log=_quiet)
    first = read_calls(tmp_path)
    assert len(first) == 2 + 3  # base and row 1 finished
    assert read_row(tmp_path / plans[2].dir)["status"] == "interrupted"
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    second = read_calls(tmp_path)[len(first):]
    assert not [c for c in second if c["stage"].startswith(("rows/r00", "rows/r01"))]
    assert len(second) == 2 * 3  # rows 2 and 3, every stage once
    assert all(read_row(tmp_path / p.dir)["status"] == "done" for p in plans)
    assert read_row(tmp_path / plans[2].dir)["attempts"] == 2


def test_a_finished_stage_of_an_unfinished_row_is_kept(tmp_path):
    _, plans = tiny_plans(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # killed after row 1 trained, during its general eval
        run_study(plans, tmp_path, run_fn=FailingRun("r01_lora_qkv_s42/general", KeyboardInterrupt), log=_quiet)
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    row1 = [c["stage"] for c in read_calls(tmp_path) if c["stage"].startswith("rows/r01")]
    assert row1.count("rows/r01_lora_qkv_s42/train") == 1 and row1.count("rows/r01_lora_qkv_s42/persona") == 1


def test_a_half_finished_training_resumes_from_its_newest_checkpoint(tmp_path):
    _, plans = tiny_plans(tmp_path)
    train_dir = tmp_path / plans[1].dir / "train"
    for step in (4, 12, 8):
        (train_dir / f"checkpoint-{step}").mkdir(parents=True)
        integrity.mark_complete(train_dir / f"checkpoint-{step}", step)
    (train_dir / "checkpoint-16").mkdir()  # killed while saving it: no completion marker
    stale_eval = tmp_path / plans[1].dir / "persona"
    stale_eval.mkdir(parents=True)
    (stale_eval / "half_written.jsonl").write_text("x")
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    train = [c for c in read_calls(tmp_path) if c["stage"] == f"{plans[1].dir}/train"]
    assert train[0]["resume"] == str(train_dir / "checkpoint-12")
    assert not (stale_eval / "half_written.jsonl").exists()  # eval stages restart clean


def test_a_checkpoint_that_failed_to_resume_is_not_tried_again(tmp_path):
    _, plans = tiny_plans(tmp_path)
    train_dir = tmp_path / plans[1].dir / "train"
    (train_dir / "checkpoint-4").mkdir(parents=True)
    integrity.mark_complete(train_dir / "checkpoint-4", 4)
    run_study(plans, tmp_path, run_fn=FailingRun("r01_lora_qkv_s42/train"), log=_quiet)
    stage = read_row(tmp_path / plans[1].dir)["stages"]["train"]
    assert stage == {"status": "failed", "resumed_from": str(train_dir / "checkpoint-4")}
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    train = [c for c in read_calls(tmp_path) if c["stage"] == f"{plans[1].dir}/train"]
    assert train[-1]["resume"] is None and not (train_dir / "checkpoint-4").exists()


def test_an_unfinished_row_with_other_options_starts_over(tmp_path):
    _, plans = tiny_plans(tmp_path)
    run_study(plans[1:2], tmp_path, run_fn=FailingRun("r01_lora_qkv_s42/persona"), log=_quiet)  # trained, then failed
    _, changed = tiny_plans(tmp_path, train={"dataset": "example", "max_samples": 8})
    n = len(read_calls(tmp_path))
    run_study(changed[1:2], tmp_path, run_fn=fake_run, log=_quiet)
    assert f"{plans[1].dir}/train" in [c["stage"] for c in read_calls(tmp_path)[n:]]  # retrained, not reused


def test_a_failing_row_is_recorded_and_the_study_goes_on(tmp_path):
    _, plans = tiny_plans(tmp_path)
    lines = []
    records = run_study(plans, tmp_path, run_fn=FailingRun("r02_freeze_mlp_aux_s42/train"), log=lines.append)
    assert [r["status"] for r in records] == ["done", "done", "failed", "done"]
    failed = read_row(tmp_path / plans[2].dir)
    assert failed["error"] == "ValueError: boom in r02_freeze_mlp_aux_s42/train"
    assert "Traceback" in failed["traceback"] and "boom" in failed["traceback"]
    assert any("failed" in line and "r02_freeze_mlp_aux_s42" in line for line in lines)
    n = len(read_calls(tmp_path))
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)  # a rerun retries only the failed row
    assert {c["stage"].split("/")[1] for c in read_calls(tmp_path)[n:]} == {"r02_freeze_mlp_aux_s42"}


def test_progress_has_a_line_per_row_with_an_eta(tmp_path):
    _, plans = tiny_plans(tmp_path)
    lines = []
    run_study(plans, tmp_path, run_fn=fake_run, log=lines.append)
    rows = [line for line in lines if line.startswith("[")]
    assert len(rows) == 4 and all("ETA" in line for line in rows) and rows[-1].startswith("[ 4/4]")
    assert "bleu-4" in rows[1] and "loss" in rows[1]


def test_a_changed_plan_is_refused_rather_than_mixed(tmp_path):
    _, plans = tiny_plans(tmp_path)
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    _, changed = tiny_plans(tmp_path, eval={"max_new_tokens": 8})
    with pytest.raises(TunelabError, match="different options"):
        run_study(changed, tmp_path, run_fn=fake_run, log=_quiet)


def test_worker_devices_round_robin():
    assert runner.worker_devices(3, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0"]
    assert runner.worker_devices(2, None) == [None, None]


def test_parallel_workers_run_every_stage_once(tmp_path):
    _, plans = tiny_plans(tmp_path)
    records = run_study(plans, tmp_path, run_fn=fake_run, workers=2, devices=["cpu"], log=_quiet)
    assert [r["status"] for r in records] == ["done"] * 4
    stages = [c["stage"] for c in read_calls(tmp_path)]
    assert len(stages) == len(set(stages)) == STAGES_PER_STUDY
    assert all(r["device"] == "" for r in records)  # "cpu" hides every GPU from the worker


# ---- the command line (fake run_fn patched in as the default) ----

def test_cli_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    from tunelab.study.cli import main

    monkeypatch.setattr(runner, "default_run_fn", FailingRun("r03_p_tuning"))
    monkeypatch.setattr(runner, "default_calibrate", fake_calibrate)
    out = tmp_path / "study"
    spec = str(REPO / "examples/study_tiny.yaml")
    assert main([spec, "--output_dir", str(out), "--set", "model_name_or_path=/models/tiny"]) == 1  # row 3 failed
    assert (out / "report.html").is_file()
    assert (out / "spec.yaml").read_text() == (REPO / "examples/study_tiny.yaml").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["set"] == {"model_name_or_path": "/models/tiny"} and len(plan["rows"]) == 4
    assert plan["rows"][1]["train"]["model_name_or_path"] == "/models/tiny"
    printed = capsys.readouterr().out
    assert "1 rows not done" in printed and "planned ≈ 1.7 TFLOP; this machine's peak 50 GFLOP/s" in printed
    monkeypatch.setattr(runner, "default_run_fn", fake_run)
    n = len(read_calls(out))
    assert main([str(out)]) == 0  # resume from the study dir: its spec.yaml, scale and --set values
    assert {c["stage"].split("/")[1] for c in read_calls(out)[n:]} == {"r03_p_tuning_s42"}


def test_cli_rows_runs_a_subset_with_the_base_row(tmp_path, monkeypatch):
    from tunelab.study.cli import main

    monkeypatch.setattr(runner, "default_run_fn", fake_run)
    monkeypatch.setattr(runner, "default_calibrate", fake_calibrate)
    out = tmp_path / "study"
    assert main([str(REPO / "examples/study_tiny.yaml"), "--output_dir", str(out), "--rows", "2"]) == 0
    assert {c["stage"].split("/")[1] for c in read_calls(out)} == {"r00_base_s42", "r02_freeze_mlp_last1_aux_s42"}
    assert "pending" in (out / "results.csv").read_text()  # rows not run yet are in the report as pending


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from tunelab.study.cli import main

    out = tmp_path / "study"
    assert main([str(REPO / "examples/study_2023_04_24.yaml"), "--output_dir", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "23 rows" in text and "r22 s42 lora_qkv_all_aux" in text and "alpaca_gpt4_en_aux" in text
    assert not out.exists()


def test_cli_errors_are_tunelab_errors(tmp_path):
    from tunelab.study.cli import main

    with pytest.raises(TunelabError, match="study spec not found"):
        main([str(tmp_path / "nope.yaml")])
    with pytest.raises(TunelabError, match="--set expects OPTION=VALUE"):
        main([str(REPO / "examples/study_tiny.yaml"), "--set", "oops"])
    with pytest.raises(TunelabError, match="unknown option 'learning_rat'"):
        main([str(REPO / "examples/study_tiny.yaml"), "--set", "learning_rat=1", "--dry-run"])
    with pytest.raises(TunelabError, match="--report_only needs a study dir"):
        main([str(tmp_path), "--report-only"])


def test_study_modules_import_without_torch():
    code = ("import sys, tunelab.study.cli, tunelab.study.runner, tunelab.study.report; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_tiny_study_end_to_end(tiny_llama_dir, tmp_path):
    """examples/study_tiny.yaml on a tiny random Llama through the real train / predict stages."""
    from tunelab.study.cli import main

    out = tmp_path / "study"
    # bf16=false: fp32 everywhere, so the run is the same on every CPU (and runs where bf16 is refused)
    argv = [str(REPO / "examples/study_tiny.yaml"), "--output_dir", str(out),
            "--set", f"model_name_or_path={tiny_llama_dir}", "--set", "bf16=false"]
    assert main(argv) == 0
    rows = {p.name: json.loads((p / "row.json").read_text()) for p in (out / "rows").iterdir()}
    names = ["r00_base_s42", "r01_lora_qkv_last1_s42", "r02_freeze_mlp_last1_aux_s42", "r03_p_tuning_s42"]
    assert sorted(rows) == names
    assert all(r["status"] == "done" for r in rows.values())
    trainable = {name: json.loads((out / "rows" / name / "train/trainable.json").read_text())["trainable_params"]
                 for name in rows if name != "r00_base_s42"}
    # tiny Llama (hidden 32, 2 kv heads of 8): LoRA r8 on the last layer's q,k,v; Freeze of its mlp; 4 prefixes
    assert trainable == {"r01_lora_qkv_last1_s42": 8 * (64 + 48 + 48), "r02_freeze_mlp_last1_aux_s42": 3 * 32 * 64,
                         "r03_p_tuning_s42": 4 * 4 * 2 * 16}
    assert (out / "rows/r01_lora_qkv_last1_s42/persona/generated_predictions.jsonl").is_file()
    # each row's two eval sets ran in one call: one model load, one generation (tunelab.evaluate.run_evals)
    assert all(r["stages"]["persona"]["run_with"] == ["general"] for r in rows.values())
    general = json.loads((out / "rows/r01_lora_qkv_last1_s42/general/predict_results.json").read_text())
    assert general["predict_generation_joint_sets"] == 2
    report = (out / "report.md").read_text()
    assert "| 3 | p_tuning | prefix | all | no | 512 |" in report
    # the per-sample likelihood measures (issue 14): files per stage, columns with CIs, verdicts on NLL
    lines = (out / "rows/r01_lora_qkv_last1_s42/general/likelihood.jsonl").read_text().splitlines()
    assert lines and {"index", "tokens", "nll", "kl"} <= set(json.loads(lines[0]))
    assert "style gain (nll)" in report and "retention (-kl)" in report and "verdict (NLL)" in report
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"style_gain_nll", "style_gain_nll_lo", "retention_nll", "retention_kl"} <= set(header)
    assert main(argv) == 0  # a rerun finds every row done
    assert all(json.loads((p / "row.json").read_text())["attempts"] == 1 for p in (out / "rows").iterdir())


# ---- the files of an earlier start are checked on every start ----

def test_a_done_row_with_an_unreadable_results_file_is_redone_with_a_warning(tmp_path):
    _, plans = tiny_plans(tmp_path)
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    bad = tmp_path / plans[1].dir / "persona/predict_results.json"
    bad.write_text('{"predict_bleu-4": 1')  # corrupted
    lines = []
    n = len(read_calls(tmp_path))
    records = run_study(plans, tmp_path, run_fn=fake_run, log=lines.append)
    assert any("r01_lora_qkv_s42 was done but persona/predict_results.json" in line for line in lines)
    assert [c["stage"] for c in read_calls(tmp_path)[n:]] == [f"{plans[1].dir}/persona"]  # only that stage
    assert all(r["status"] == "done" for r in records) and json.loads(bad.read_text())


def test_an_unreadable_row_json_reruns_the_row_keeping_its_finished_stages(tmp_path, caplog):
    _, plans = tiny_plans(tmp_path)
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    (tmp_path / plans[2].dir / "row.json").write_text("{\"status\": \"do")
    n = len(read_calls(tmp_path))
    run_study(plans, tmp_path, run_fn=fake_run, log=_quiet)
    assert "row.json is unreadable" in caplog.text
    assert read_calls(tmp_path)[n:] == []  # every stage's results were whole: nothing recomputed
    assert read_row(tmp_path / plans[2].dir)["status"] == "done"


def test_an_unreadable_plan_json_is_one_line(tmp_path):
    from tunelab.study.cli import main

    (tmp_path / "spec.yaml").write_text((REPO / "examples/study_tiny.yaml").read_text())
    (tmp_path / "plan.json").write_text('{"rows": [')
    for argv in ([str(tmp_path)], [str(tmp_path), "--report_only"]):
        with pytest.raises(TunelabError, match="plan.json is unreadable .*restart from the spec"):
            main(argv)
