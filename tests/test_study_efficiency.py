"""Study-level efficiency (tunelab/study/efficiency.py, calibrate.py, progress.py): the FLOP formula and
the ETA arithmetic by hand, MFU and time split from fixture row files, the runner's start line and
session record with a fake calibration, and the calibration's model shape / token counts on a tiny model.
No test measures or asserts a speed."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from test_study_fakes import FailingRun, fake_run, tiny_plans

from tunelab.study import efficiency as eff
from tunelab.study.efficiency import Budget, EvalTokens, ModelShape
from tunelab.study.runner import run_study

SHAPE = ModelShape(layers=(10, 10, 10, 10), other_body=2, head=5)  # body 42


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


# ---- formula and ETA arithmetic ----

def test_flop_formula_by_hand():
    assert SHAPE.body == 42 and SHAPE.active(0) == 42 and SHAPE.active(3) == 12
    # full fine-tuning: forward 2N + input grads 2N + weight grads 2N = 6N per token
    assert eff.train_flops(SHAPE, 100, 0, SHAPE.body) == 6 * 42 * 100
    # Freeze of the last layer: backward stops at layer 3 and trains its 10 parameters
    assert eff.train_flops(SHAPE, 100, 3, 10) == 2 * 100 * (42 + 12 + 10)
    # the head (5) runs forward and passes input gradients back at the 30 supervised positions only
    assert eff.train_flops(SHAPE, 100, 3, 10, supervised=30) == 2 * 100 * (42 + 12 + 10) + 4 * 5 * 30
    assert eff.scoring_flops(SHAPE, 50, 20) == 2 * (42 * 50 + 5 * 20)
    assert eff.generation_flops(SHAPE, 30, 8) == 2 * (42 * 38 + 5 * 8)
    assert eff.lowest_trainable_layer("lora", [2, 3]) == 2
    assert eff.lowest_trainable_layer("p_tuning", [3]) == 0 and eff.lowest_trainable_layer("freeze", []) == 0


def test_planned_row_flops_and_train_steps():
    tokens = EvalTokens(samples=4, scored=200, reference=80, prompt=120, generated_samples=2, max_new_tokens=10)
    score, gen = tokens.flops(SHAPE, generate=True)
    assert score == 2 * (42 * 200 + 5 * 80)
    assert gen == 2 * (42 * (60 + 20) + 5 * 20)  # half the samples' prompts, 10 new tokens each
    assert tokens.flops(SHAPE, generate=False) == (score, 0.0)
    row = eff.planned_row_flops(SHAPE, 1000, 3, 10, [(tokens, True)], trajectory_points=2)
    assert row == {"train": 2 * 1000 * 64, "scoring": 3 * score, "generation": gen}
    assert eff.planned_row_flops(SHAPE, 1000, 3, 10, [], supervised=300)["train"] == 2 * 1000 * 64 + 4 * 5 * 300
    assert eff.planned_row_flops(SHAPE, None, 0, 0, [(tokens, True)])["train"] == 0.0
    assert eff.train_steps(61, 8, 2) == 16 and eff.train_steps(10, 4, 1.5) == 5


def test_lower_layer_cache_plans_the_lower_layers_once():
    """Freeze of the last layer (k = 3, lower layers 30 of the body's 42): training runs them over one epoch
    instead of two, and not at all when an earlier row cached that data; likelihood passes likewise;
    generation runs every layer."""
    tokens = EvalTokens(samples=4, scored=200, reference=80, prompt=120, generated_samples=2, max_new_tokens=10)
    full = eff.planned_row_flops(SHAPE, 1000, 3, 10, [(tokens, True)])
    first = eff.with_lower_layer_cache(full, SHAPE, 3, (1000, 2.0, True), [(tokens, True)])
    assert first["train"] == full["train"] - 2 * 500 * 30  # lower layers over one epoch of 500 tokens
    assert first["scoring"] == full["scoring"] and first["generation"] == full["generation"]
    later = eff.with_lower_layer_cache(full, SHAPE, 3, (1000, 2.0, False), [(tokens, False)])
    assert later["train"] == 2 * 1000 * (12 + 12 + 10)  # only layers >= 3, forward and backward
    assert later["scoring"] == 2 * (12 * 200 + 5 * 80) and later["generation"] == full["generation"]


def test_eta_before_and_after_rows_finish():
    budget = Budget({"rows/a": {"train": 1e12}, "rows/b": {"train": 2e12}}, peak_gflops=100, precision="fp32")
    line = budget.start_line(["rows/a", "rows/b"])
    # 3e12 FLOP at 52% (fp32's expected MFU) of 1e11 FLOP/s = 58 s
    assert line == ("planned ≈ 3.0 TFLOP; this machine's peak 100 GFLOP/s (fp32); ETA ≈ 1 min "
                    "(at an assumed 52% MFU)")
    assert eff.eta_seconds(3e12, 1e11, eff.expected_mfu("fp32")) == pytest.approx(3e12 / 5.2e10)
    budget.finished("rows/a")  # row a took 20 s (no split known): 1e12 / (20 x 1e11) = 50% of the peak
    left, mfu = budget.eta(["rows/a", "rows/b"], elapsed=20)
    assert mfu == pytest.approx(0.5) and left == pytest.approx(40)
    two = Budget({"rows/a": {"train": 1e12}}, peak_gflops=100, precision="bf16", devices=2)
    assert "x 2 devices" in two.start_line(["rows/a"]) and two.peak_flops == 2e11


def test_eta_takes_each_part_at_its_own_rate():
    """A base row that only scores and generates (its generation planned at max_new_tokens, done far faster)
    says nothing about training: training keeps the expected MFU until a training row has finished."""
    base = {"train": 0.0, "scoring": 5e11, "generation": 5e11}
    tuned = {"train": 2e12, "scoring": 5e11, "generation": 5e11}
    budget = Budget({"a": base, "b": tuned, "c": tuned}, peak_gflops=100, precision="fp32")
    budget.finished("a", {"train": 0.0, "scoring": 10.0, "generation": 2.0, "other": 1.0})
    left, mfu = budget.eta(["a", "b", "c"], elapsed=13.0)
    per_row = 2e12 / (1e11 * 0.52) + 5e11 / (5e11 / 10) + 5e11 / (5e11 / 2)  # train at 52%, the rest as row a
    assert left == pytest.approx(2 * per_row * 13 / 12)  # loading etc.: elapsed over the parts' seconds
    assert mfu == pytest.approx(1e12 / (13 * 1e11))
    budget.finished("b", {"train": 25.0, "scoring": 10.0, "generation": 2.0})  # training at 80 GFLOP/s
    left, _ = budget.eta(["a", "b", "c"], elapsed=51.0)
    assert left == pytest.approx((2e12 / 8e10 + 10 + 2) * 51 / 49)
    failed = Budget({"a": base, "b": tuned}, peak_gflops=100, precision="fp32")
    failed.finished("a", {})  # a row whose parts are unknown (failed): the planned-FLOP rate over elapsed
    assert failed.eta(["a", "b"], elapsed=10.0)[0] == pytest.approx(3e12 / (1e12 / 10))


def test_expected_mfu_per_precision_is_what_the_first_eta_and_budget_plan_with():
    assert eff.expected_mfu("bf16") == eff.EXPECTED_MFU
    assert eff.expected_mfu("fp32") > eff.expected_mfu("bf16")
    assert eff.expected_mfu("fp8") == eff.EXPECTED_MFU  # anything else: the default
    for precision in ("bf16", "fp32"):
        budget = Budget({"rows/a": {"train": 1e12}}, peak_gflops=100, precision=precision)
        assert f"assumed {eff.expected_mfu(precision):.0%} MFU" in budget.start_line(["rows/a"])
        assert budget.eta(["rows/a"], elapsed=0)[1] == eff.expected_mfu(precision)  # before a row ends


def test_a_long_study_not_sized_to_a_time_names_budget():
    long = Budget({"rows/a": {"train": 1e15}}, peak_gflops=100, precision="bf16")  # 1e15 / (1e11 x 0.4) = 7 h
    assert "--budget 30m would size the study to 30 minutes" in long.start_line(["rows/a"])
    assert "--budget" not in long.start_line(["rows/a"], sized=True)
    short = Budget({"rows/a": {"train": 6e13}}, peak_gflops=100, precision="bf16")  # 25 min
    assert "--budget" not in short.start_line(["rows/a"])


# ---- from fixture files ----

def _fixture_study(tmp_path: Path) -> list[dict]:
    """Base row (eval only, recorded tokens and a split) and one trained row with a planned entry only."""
    entries = [{"id": 0, "dir": "rows/r00_base_s42"}, {"id": 1, "dir": "rows/r01_freeze_s42"}]
    base, row = tmp_path / entries[0]["dir"], tmp_path / entries[1]["dir"]
    _write(base / "row.json", {"status": "done", "stages": {"persona": {"seconds": 30.0}}})
    _write(base / "persona/predict_results.json",
           {"predict_tokens_scored": 200, "predict_tokens_generated": 20, "predict_likelihood_samples": 4,
            "predict_generated_samples": 2, "predict_scoring_runtime": 10.0, "predict_generation_runtime": 15.0})
    (base / "persona/likelihood.jsonl").write_text(
        "".join(json.dumps({"index": i, "tokens": 20, "nll": 2.0, "kl": 0.0}) + "\n" for i in range(4)))
    _write(row / "row.json", {"status": "done", "stages": {"train": {"seconds": 50.0}, "persona": {"seconds": 20.0}}})
    _write(row / "train/trainer_state.json", {"global_step": 4, "num_input_tokens_seen": 1000})
    _write(row / "train/trainable.json", {"finetuning_type": "freeze", "trainable_params": 10, "layers": [3]})
    _write(row / "persona/predict_results.json", {"predict_bleu-4": 1.0})  # no token counts: planned ones
    _write(tmp_path / eff.EFFICIENCY_FILE, {
        "calibration": {"peak_gflops": 1e-6, "precision": "fp32", "model": SHAPE.to_dict(),
                        "rows": {"rows/r01_freeze_s42": {"flops": {"train": 1.0, "scoring": 500.0, "generation": 700.0}}}},
        "sessions": [{"seconds": 60.0}, {"seconds": 40.0}]})
    return entries


def test_mfu_and_time_split_from_row_files(tmp_path):
    entries = _fixture_study(tmp_path)
    study = eff.read_efficiency(tmp_path, entries)
    base_flops = 2 * (42 * 200 + 5 * 80) + 2 * (42 * (120 * 2 / 4 + 20) + 5 * 20)
    row_flops = 2 * 1000 * (42 + 12 + 10) + 500 + 700  # recorded train tokens; planned eval
    assert [f for _, _, f in study.rows] == [pytest.approx(base_flops), pytest.approx(row_flops)]
    assert study.wall_seconds == 100.0  # two sessions
    assert study.mfu == pytest.approx((base_flops + row_flops) / (100.0 * 1e-6 * 1e9))
    splits = dict((d, s) for d, s, _ in study.rows)
    assert splits["rows/r00_base_s42"] == {"train": 0.0, "scoring": 10.0, "generation": 15.0, "eval_unsplit": 0.0,
                                           "other": 5.0}
    assert splits["rows/r01_freeze_s42"]["train"] == 50.0 and splits["rows/r01_freeze_s42"]["eval_unsplit"] == 20.0
    assert study.totals()["scoring"] == 10.0
    assert set(study.part_mfu()) == {"train"}  # a row's eval time is not split: no scoring / generation figure


def test_generation_counts_only_the_prompt_tokens_it_ran(tmp_path):
    """A stage that records generation_prompt_tokens (prompts decoded on from the likelihood pass's keys/values
    run only their last token) is counted with those, not with every prompt's tokens."""
    entries = _fixture_study(tmp_path)
    path = tmp_path / entries[0]["dir"] / "persona/predict_results.json"
    _write(path, {**json.loads(path.read_text()), "predict_generation_prompt_tokens": 2})
    base_flops = 2 * (42 * 200 + 5 * 80) + 2 * (42 * (2 + 20) + 5 * 20)
    assert eff.read_efficiency(tmp_path, entries).rows[0][2] == pytest.approx(base_flops)


def test_the_lower_layer_cache_and_the_base_pass_count_what_they_ran(tmp_path):
    """A row on cached layer-3 inputs counts layers 0-2 only for the tokens they ran over (train and eval), the
    base pass's forward counts as scoring (FLOPs and time); a row from before these records takes the plan."""
    entries = _fixture_study(tmp_path)
    row = tmp_path / entries[1]["dir"]
    _write(row / "train/train_results.json", {"train_cached_layer": 3, "train_lower_layer_tokens": 400,
                                              "train_supervised_tokens": 300})
    _write(row / "persona/predict_results.json",
           {"predict_tokens_scored": 200, "predict_cached_layer": 3, "predict_lower_layer_tokens": 50,
            "predict_base_pass_tokens": 200, "predict_base_pass_runtime": 4.0, "predict_scoring_runtime": 6.0,
            "predict_likelihood_samples": 4, "predict_generated_samples": 0})
    (row / "persona/likelihood.jsonl").write_text(
        "".join(json.dumps({"index": i, "tokens": 20, "nll": 2.0, "kl": 0.0}) + "\n" for i in range(4)))
    lower = 42 - 12  # body - N_active(3): the three layers below k = 3
    train = 2 * 1000 * (42 + 12 + 10) - 2 * lower * (1000 - 400) + 4 * 5 * 300  # + the head at 300 positions
    scoring = 2 * (42 * 200 + 5 * 80) - 2 * lower * (200 - 50) + 2 * (42 * 200 + 5 * 80)  # + the base pass
    study = eff.read_efficiency(tmp_path, entries)
    assert study.rows[1][2] == pytest.approx(train + scoring)
    assert study.rows[1][1]["scoring"] == 10.0 and study.rows[1][1]["other"] == 10.0
    # per part over both rows (the base row: scoring 10 s, generation 15 s), at a peak of 1e3 FLOP/s
    base_scoring, base_generation = 2 * (42 * 200 + 5 * 80), 2 * (42 * (120 * 2 / 4 + 20) + 5 * 20)
    assert study.part_flops == pytest.approx({"train": train, "scoring": base_scoring + scoring,
                                              "generation": base_generation})
    assert study.part_mfu() == pytest.approx({"train": train / 50 / 1e3, "scoring": (base_scoring + scoring) / 20 / 1e3,
                                              "generation": base_generation / 15 / 1e3})
    # the same row without the records (an older study): the plan's scoring (500), not every layer's
    _write(row / "persona/predict_results.json", {"predict_tokens_scored": 200, "predict_likelihood_samples": 4,
                                                  "predict_generated_samples": 0})
    (row / "train/train_results.json").unlink()
    assert eff.read_efficiency(tmp_path, entries).rows[1][2] == pytest.approx(2 * 1000 * (42 + 12 + 10) + 500)
    _write(row / "train/trainer_state.json", {"global_step": 4})  # no recorded tokens either: the plan's train (1.0)
    assert eff.read_efficiency(tmp_path, entries).rows[1][2] == pytest.approx(1.0 + 500)


def test_no_calibration_leaves_flops_unknown_but_splits_time(tmp_path):
    entries = _fixture_study(tmp_path)
    (tmp_path / eff.EFFICIENCY_FILE).unlink()
    study = eff.read_efficiency(tmp_path, entries)
    assert study.flops is None and study.mfu is None and study.wall_seconds == 30.0 + 70.0


# ---- the runner with a fake calibration ----

def test_the_start_line_knows_a_study_sized_by_budget_from_plan_json(tmp_path):
    from tunelab.study.progress import start_session

    big = {"peak_gflops": 100.0, "precision": "bf16", "rows": {"r": {"flops": {"train": 1e15}}}}
    for meta, named in (({}, True), ({"budget": {"seconds": 1800}}, False)):
        (tmp_path / "plan.json").write_text(json.dumps({**meta, "rows": []}))
        lines = []
        start_session(tmp_path, [], [types.SimpleNamespace(dir="r")], lambda plans, devices: big, 1, lines.append)
        assert ("--budget" in lines[0]) is named


def fake_calibrate(plans, devices):
    return {"peak_gflops": 50.0, "precision": "fp32", "devices": devices, "model": SHAPE.to_dict(),
            "rows": {p.dir: {"train_tokens": 100 if p.train else None,
                             "flops": {"train": 3e11 if p.train else 0.0, "scoring": 1e11, "generation": 1e11}}
                     for p in plans}}


def test_the_study_states_its_planned_cost_at_the_start_and_mfu_per_row(tmp_path):
    _, plans = tiny_plans(tmp_path)
    lines = []
    run_study(plans, tmp_path, run_fn=fake_run, log=lines.append, calibrate=fake_calibrate)
    # 2e11 for the base row + 3 x 5e11 = 1.7e12 FLOP at 52% of 50 GFLOP/s = 65 s
    assert lines[1] == ("planned ≈ 1.7 TFLOP; this machine's peak 50 GFLOP/s (fp32); ETA ≈ 1 min "
                        "(at an assumed 52% MFU)")
    rows = [line for line in lines if line.startswith("[")]
    assert all("study MFU" in line and "ETA" in line for line in rows)
    data = json.loads((tmp_path / eff.EFFICIENCY_FILE).read_text())
    assert data["calibration"]["peak_gflops"] == 50.0 and len(data["sessions"]) == 1
    assert data["sessions"][0]["rows"] == 4
    run_study(plans, tmp_path, run_fn=fake_run, log=lines.append, calibrate=fake_calibrate)  # nothing to run
    assert len(json.loads((tmp_path / eff.EFFICIENCY_FILE).read_text())["sessions"]) == 1


def test_the_peak_is_measured_again_at_the_end_and_the_mfu_takes_the_highest(tmp_path):
    """A slow moment of a shared host at the study's start must not flatter its MFU: the session's end measures
    the peak again (not after a stop), and the report divides by the highest measure and names the lowest."""
    from tunelab.study.results import read_study
    from tunelab.study.sections import efficiency_blocks

    _, plans = tiny_plans(tmp_path)
    measured = []

    def peak(precision):
        measured.append(precision)
        return 80.0

    with pytest.raises(KeyboardInterrupt):  # stopped: ends at once, no measure
        run_study(plans, tmp_path, run_fn=FailingRun("r02_freeze_mlp_aux_s42/train", KeyboardInterrupt),
                  log=lambda line: None, calibrate=fake_calibrate, measure_peak=peak)
    run_study(plans, tmp_path, run_fn=fake_run, log=lambda line: None, calibrate=fake_calibrate, measure_peak=peak)
    assert measured == ["fp32"]
    data = json.loads((tmp_path / eff.EFFICIENCY_FILE).read_text())
    assert "peak_gflops_end" not in data["sessions"][0] and data["sessions"][1]["peak_gflops_end"] == 80.0
    for session in data["sessions"]:
        session["seconds"] = 10.0  # fake rows take ~0 s
    (tmp_path / eff.EFFICIENCY_FILE).write_text(json.dumps(data))
    entries = json.loads((tmp_path / "plan.json").read_text())["rows"]
    study = eff.read_efficiency(tmp_path, entries)
    assert study.peak_gflops == 80.0 and sorted(study.peak_measures) == [50.0, 80.0]
    assert study.mfu == pytest.approx(study.flops / (20.0 * 80e9))
    text = efficiency_blocks(tmp_path, read_study(tmp_path))[0][2]
    assert "peak measured 80 GFLOP/s (the highest of 2 measures, the lowest 50)" in text


def test_a_failed_calibration_falls_back_to_row_times(tmp_path):
    _, plans = tiny_plans(tmp_path)
    lines = []
    run_study(plans, tmp_path, run_fn=fake_run, log=lines.append,
              calibrate=lambda plans, devices: {"errors": ["OSError: no model"]})
    assert lines[1] == "calibration incomplete (OSError: no model): the ETA comes from row times"
    assert all("ETA" in line for line in lines if line.startswith("["))


# ---- the calibration's measurements on a tiny model ----

def test_model_shape_counts_every_non_embedding_parameter(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.study.calibrate import model_shape

    shape, tokenizer = model_shape(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values()) - embed.numel() - (head.numel() if id(head) != id(embed) else 0)
    assert len(shape.layers) == model.config.num_hidden_layers and shape.body == total
    assert shape.head == head.numel() and tokenizer.pad_token is not None


def test_planned_tokens_from_the_tokenized_data(tiny_llama_dir, tmp_path):
    from tunelab.study.calibrate import measure_peak, model_shape, plan_rows

    _, plans = tiny_plans(tmp_path, shared={"dataset_dir": "data", "max_source_length": 64,
                                            "model_name_or_path": str(tiny_llama_dir)}, eval_every=1)
    shape, tokenizer = model_shape(str(tiny_llama_dir))
    planned = plan_rows(plans, shape, tokenizer)
    base, lora = planned[plans[0].dir], planned[plans[1].dir]
    assert base["train_tokens"] is None and base["flops"]["train"] == 0.0 and base["flops"]["generation"] > 0
    assert lora["train_tokens"] > 0 and lora["flops"]["train"] > 0
    # LoRA (1 epoch of 4 samples, batch 8 by default -> 1 step: no trajectory point before the last step)
    assert lora["flops"]["scoring"] == pytest.approx(base["flops"]["scoring"])
    assert measure_peak("fp32", seconds=0.05) > 0


def test_study_precision_follows_the_machine(monkeypatch):
    """The real calibration's precision choice (it imports tunelab's CPU check: a moved function fails here)."""
    from tunelab import setup
    from tunelab.study.calibrate import study_precision

    assert study_precision({"bf16": False}) == "fp32"
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert study_precision({}) == expected
