"""Trajectories (tunelab/study/trajectory.py): `eval_every` in the spec, the runner scoring every saved
checkpoint with a likelihood-only eval (resumable), and the paths read back from fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_study_fakes import fake_run, tiny_plans, tiny_spec_dict

from tunelab.errors import TunelabError
from tunelab.study import trajectory
from tunelab.study.runner import read_row, run_study
from tunelab.study.spec import expand, parse_spec

TRAIN_STEPS = 4  # write_train_files logs 4 steps


def _quiet(_line: str) -> None:
    pass


def write_likelihood(out: Path, nlls: list[float], kls: list[float] | None = None) -> None:
    """likelihood.jsonl in the contract's format: index, tokens, nll, kl per sample."""
    out.mkdir(parents=True, exist_ok=True)
    kls = kls or [0.0] * len(nlls)
    lines = [json.dumps({"index": i, "tokens": 10, "nll": n, "kl": k}) for i, (n, k) in enumerate(zip(nlls, kls))]
    (out / "likelihood.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _study_dir(out: Path) -> Path:
    return next(p.parent for p in out.parents if p.name == "rows")


def _step_of(args) -> int:
    """0 for the base model, the checkpoint's step, or TRAIN_STEPS for a row's final weights."""
    ckpt = args.model.checkpoint_dir
    if not ckpt:
        return 0
    name = Path(ckpt).name
    return int(name.split("-")[1]) if name.startswith("checkpoint-") else TRAIN_STEPS


def trajectory_run(args) -> dict:
    """fake_run plus what a real run writes for trajectories: checkpoint-* folders every save_steps while
    training, and likelihood.jsonl (+ eval_results.json for do_eval) in eval stages. Persona NLL falls
    0.1 per step, general NLL rises 0.05 per step, from 2.0 at the base model."""
    out = Path(args.training.output_dir)
    with (_study_dir(out) / "trajectory_calls.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(str(out.relative_to(_study_dir(out)))) + "\n")
    if args.training.do_train:
        metrics = fake_run(args)
        every = args.training.save_steps if args.training.save_strategy == "steps" else 0
        for step in range(int(every), TRAIN_STEPS + 1, int(every)) if every and every < 1000 else ():
            (out / f"checkpoint-{step}").mkdir()
        return metrics
    step = _step_of(args)
    persona = "persona" in str(out)
    metrics = {"eval_nll": 2.0}
    out.mkdir(parents=True, exist_ok=True)
    if args.training.do_eval:
        (out / "eval_results.json").write_text(json.dumps(metrics), encoding="utf-8")
    else:
        metrics = fake_run(args)  # its own likelihood.jsonl is replaced below
    write_likelihood(out, [2.0 - 0.1 * step if persona else 2.0 + 0.05 * step] * 3)
    return metrics


class FailAt:
    """trajectory_run, except the stage whose output dir contains `match` raises KeyboardInterrupt."""

    def __init__(self, match: str):
        self.match = match

    def __call__(self, args) -> dict:
        if self.match in str(args.training.output_dir):
            raise KeyboardInterrupt(self.match)
        return trajectory_run(args)


def calls(study_dir: Path) -> list[str]:
    path = study_dir / "trajectory_calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- the spec ----

@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_eval_every_must_be_a_positive_integer(bad):
    with pytest.raises(TunelabError, match="eval_every must be a positive integer") as err:
        parse_spec(tiny_spec_dict(eval_every=bad))
    assert "\n" not in str(err.value)


def test_eval_every_in_a_scale_is_checked_too():
    with pytest.raises(TunelabError, match="scales: quick: eval_every must be a positive integer"):
        parse_spec(tiny_spec_dict(scales={"quick": {"eval_every": 0}}))


def test_eval_every_keeps_a_checkpoint_every_n_steps(tmp_path):
    plans = expand(parse_spec(tiny_spec_dict(eval_every=2)), None, tmp_path)
    assert plans[0].eval_every is None and plans[0].train is None  # the base row trains nothing
    assert all(p.eval_every == 2 for p in plans[1:])
    assert all(p.train["save_steps"] == 2 and p.train["save_total_limit"] is None for p in plans[1:])
    plain = expand(parse_spec(tiny_spec_dict()), None, tmp_path)
    assert "save_steps" not in plain[1].train and plain[1].fingerprint() != plans[1].fingerprint()
    scaled = expand(parse_spec(tiny_spec_dict(scales={"quick": {"eval_every": 3}})), "quick", tmp_path)
    assert scaled[1].train["save_steps"] == 3


# ---- the runner ----

def test_every_checkpoint_is_scored_without_generation(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=1)
    records = run_study(plans, tmp_path, run_fn=trajectory_run, log=_quiet)
    assert [r["status"] for r in records] == ["done"] * 4
    row = tmp_path / plans[1].dir
    # checkpoints 1..4; the one at the last step (4) is the final weights, scored by the row's eval stages
    points = sorted(str(p.relative_to(row)) for p in row.glob("trajectory/*/step-*"))
    assert points == [f"trajectory/{s}/step-{k}" for s in ("general", "persona") for k in (1, 2, 3)]
    args = json.loads((row / "trajectory/persona/step-2/eval_results.json").read_text())
    assert args == {"eval_nll": 2.0}
    assert read_row(row)["stages"]["trajectory"]["points"] == 6
    assert not (tmp_path / plans[0].dir / "trajectory").exists()


def test_point_options_are_likelihood_only(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=2)
    run_study(plans[1:2], tmp_path, run_fn=trajectory_run, log=_quiet)  # trains row 1, makes checkpoint-2
    (point,) = [p for p in trajectory.planned_points(plans[1].evals, tmp_path / plans[1].dir) if p[0] == "persona"]
    name, step, cfg = point
    assert (name, step) == ("persona", 2)
    assert cfg["do_eval"] and not cfg["do_predict"] and not cfg["predict_with_generate"]
    assert cfg["checkpoint_dir"].endswith("train/checkpoint-2") and cfg["dataset"] == "example"


def test_trajectory_points_resume_after_a_kill(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        run_study(plans, tmp_path, run_fn=FailAt("r01_lora_qkv_s42/trajectory/persona/step-2"), log=_quiet)
    first = calls(tmp_path)
    assert read_row(tmp_path / plans[1].dir)["stages"]["trajectory"]["status"] == "interrupted"
    run_study(plans, tmp_path, run_fn=trajectory_run, log=_quiet)
    again = [c for c in calls(tmp_path)[len(first):] if c.startswith("rows/r01")]
    # points run step by step, each set in turn: persona/1 and general/1 were scored before the kill;
    # train and the row's own eval stages are not redone either
    point = "rows/r01_lora_qkv_s42/trajectory/{}/step-{}".format
    assert again == [point("persona", 2), point("general", 2), point("persona", 3), point("general", 3)]


def test_retraining_rescores_every_point(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=2)
    row = tmp_path / plans[1].dir
    stale = row / "trajectory/persona/step-2"
    stale.mkdir(parents=True)
    (stale / "eval_results.json").write_text("{}")  # from a training that is redone below
    run_study(plans[1:2], tmp_path, run_fn=trajectory_run, log=_quiet)
    assert "rows/r01_lora_qkv_s42/trajectory/persona/step-2" in calls(tmp_path)
    assert json.loads((stale / "eval_results.json").read_text()) == {"eval_nll": 2.0}


# ---- reading the paths back ----

def test_paths_from_fixture_files(tmp_path):
    _, plans = tiny_plans(tmp_path, eval_every=1)
    run_study(plans, tmp_path, run_fn=trajectory_run, log=_quiet)
    plan = json.loads((tmp_path / "plan.json").read_text())
    paths = trajectory.read_trajectories(tmp_path, plan, {"persona": "style", "general": "retention"})
    assert [t.row_id for t in paths] == [1, 2, 3]
    steps, style, retention = zip(*paths[0].points)
    assert steps == (0, 1, 2, 3, 4)
    assert style == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert retention == pytest.approx([0.0, -0.05, -0.1, -0.15, -0.2])


def test_paired_values_per_measure():
    base = {0: {"nll": 2.0, "kl": 0.0}, 1: {"nll": 3.0, "kl": 0.0}, 2: {"nll": 1.0, "kl": 0.0}}
    row = {0: {"nll": 1.5, "kl": 0.2}, 1: {"nll": 3.5, "kl": 0.4}}  # sample 2 not scored: left out
    assert trajectory.paired_value("nll", "style", base, row) == pytest.approx(0.0)
    assert trajectory.paired_value("kl", "retention", base, row) == pytest.approx(-0.3)
    assert trajectory.paired_value("kl", "style", base, row) == pytest.approx(0.3)
    assert trajectory.paired_value("nll", "style", base, base) == 0.0  # the base against itself
    assert trajectory.trajectory_measures({"style": "bleu_rouge", "retention": "kl"}) == {"style": "nll",
                                                                                        "retention": "kl"}


def test_no_likelihood_files_no_paths(tmp_path):
    def plain(args):  # a stage of a tunelab before likelihood.jsonl
        metrics = fake_run(args)
        (Path(args.training.output_dir) / "likelihood.jsonl").unlink(missing_ok=True)
        return metrics

    _, plans = tiny_plans(tmp_path)
    run_study(plans, tmp_path, run_fn=plain, log=_quiet)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert trajectory.read_trajectories(tmp_path, plan, {"persona": "style", "general": "retention"}) == []


def test_real_stages_score_a_checkpoint(tiny_llama_dir, tmp_path):
    """Base + one LoRA row on a tiny random Llama through the real train / eval stages: a checkpoint
    after every step, each but the last scored by a likelihood-only eval of that checkpoint."""
    pytest.importorskip("peft")
    shared = {"dataset_dir": "data", "max_source_length": 64, "model_name_or_path": str(tiny_llama_dir), "bf16": False}
    train = {"dataset": "example", "max_samples": 4, "num_train_epochs": 1, "per_device_train_batch_size": 1}
    _, plans = tiny_plans(tmp_path, shared=shared, train=train, eval_every=1)
    records = run_study(plans[:2], tmp_path, log=_quiet, calibrate=lambda plans, devices: {})
    assert [r["status"] for r in records] == ["done", "done"], records[1].get("error")
    row = tmp_path / plans[1].dir
    steps = json.loads((row / "train/trainer_state.json").read_text())["global_step"]
    assert steps >= 2 and len(list((row / "train").glob("checkpoint-*"))) == steps
    point = row / "trajectory/general/step-1"
    assert "eval_loss" in json.loads((point / "eval_results.json").read_text())
    assert not (point / "generated_predictions.jsonl").exists()  # no generation
    assert json.loads((point / "tunelab_args.json").read_text())["checkpoint_dir"].endswith("checkpoint-1")
    assert not (row / f"trajectory/general/step-{steps}").exists()  # the last step is the row's own eval
    assert len(list(row.glob("trajectory/*/step-*"))) == 2 * (steps - 1)
