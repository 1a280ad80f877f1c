"""Study executors with the fake run_fn (tests/test_study_fakes.py): submitit's local executor and Ray on
this machine write the same row dirs as the local executor, a study one executor left half done is
finished by another without redoing anything, the Slurm job array for the 2023 layout (3 rows per GPU)
is what sbatch receives, and executor options fail fast. No cluster needed.

Every job process imports torch and transformers to parse a stage's options (~5-10 s on a busy 2-core
machine), so the executor runs are kept to one test with few processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.test_study_fakes import FailingRun, fake_run, read_calls, tiny_plans
from tunelab.errors import TunelabError
from tunelab.study import executors
from tunelab.study.executors import LocalExecutor, RayExecutor, Resources, SlurmExecutor
from tunelab.study.runner import read_row, run_study

REPO = Path(__file__).resolve().parents[1]


def _quiet(_line: str) -> None:
    pass


@pytest.fixture
def importable_fakes(monkeypatch):
    """Job processes unpickle the fake run_fn by module name (tests.test_study_fakes): let them import it."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def ray_local():
    """Ray on this machine with 2 CPUs (started once for the module: start-up takes ~10 s)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def row_files(study_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(study_dir)) for p in (study_dir / "rows").rglob("*") if p.is_file())


def outcome(study_dir: Path, plans) -> dict:
    """What the report sees of each row: status and each stage's status and metrics."""
    out = {}
    for plan in plans:
        record = read_row(study_dir / plan.dir)
        out[plan.dir] = (record["status"], {k: (v["status"], v.get("metrics")) for k, v in record["stages"].items()})
    return out


def test_slurm_then_ray_write_what_the_local_executor_writes_and_redo_nothing(tmp_path, importable_fakes, ray_local):
    """Rows 0-2 on submitit's local executor, 2 rows per GPU (array task 0 runs rows 0 and 1 side by side,
    task 1 runs row 2, which fails); Ray then finishes the study: only row 2 runs again, and the study dir
    is what the local executor writes for the same rows."""
    pytest.importorskip("submitit")
    ref = tmp_path / "local"
    _, ref_plans = tiny_plans(ref)
    run_study(ref_plans[:3], ref, run_fn=fake_run, log=_quiet, executor=LocalExecutor())
    study = tmp_path / "cluster"
    _, plans = tiny_plans(study)
    plans = plans[:3]

    slurm = SlurmExecutor(study / "slurm", Resources(rows_per_gpu=2), partition="gpu", cluster="local", poll_s=0.2)
    records = run_study(plans, study, run_fn=FailingRun("r02_freeze_mlp_aux_s42/train"), log=_quiet, executor=slurm)
    assert [r["status"] for r in records] == ["done", "done", "failed"] and "boom" in records[2]["error"]
    assert all(r["device"] == "0" for r in records)  # each ran inside an array task holding 1 GPU
    n = len(read_calls(study))

    records = run_study(plans, study, run_fn=fake_run, log=_quiet,
                        executor=RayExecutor(Resources(gpus_per_row=0, cpus_per_row=1)))
    assert [r["status"] for r in records] == ["done"] * 3
    assert {c["stage"].split("/")[1] for c in read_calls(study)[n:]} == {"r02_freeze_mlp_aux_s42"}
    assert read_row(study / plans[2].dir)["attempts"] == 2
    assert row_files(study) == row_files(ref)
    assert outcome(study, plans) == outcome(ref, ref_plans[:3])
    assert ray_local.is_initialized()  # a Ray the executor did not start is left running


def test_ray_refuses_a_row_no_node_can_hold(tmp_path, ray_local):
    _, plans = tiny_plans(tmp_path)
    with pytest.raises(TunelabError, match="--gpus_per_row 0"):
        run_study(plans[:1], tmp_path, run_fn=fake_run, log=_quiet, executor=RayExecutor(Resources(cpus_per_row=1)))
    with pytest.raises(TunelabError, match="--cpus_per_row"):
        run_study(plans[:1], tmp_path, run_fn=fake_run, log=_quiet,
                  executor=RayExecutor(Resources(gpus_per_row=0, cpus_per_row=64)))


def test_a_dead_job_marks_its_unfinished_rows_failed(tmp_path):
    class DeadJob:
        job_id = "77_0"

        def result(self):
            raise RuntimeError("Job 77_0 (task: 0) failed: OUT_OF_MEMORY")

    _, plans = tiny_plans(tmp_path)
    run_study(plans[:1], tmp_path, run_fn=fake_run, log=_quiet)  # row 0 finished before the job died
    records = executors._job_records(DeadJob(), plans[:2], tmp_path)
    assert records[0]["status"] == "done"
    assert records[1]["status"] == "failed" and "slurm job 77_0 failed" in records[1]["error"]
    assert "OUT_OF_MEMORY" in read_row(tmp_path / plans[1].dir)["error"]


def test_slurm_off_a_slurm_login_node_says_so(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    _, plans = tiny_plans(tmp_path)
    with pytest.raises(TunelabError, match="sbatch not found"):
        SlurmExecutor(tmp_path / "slurm").run(plans[:1], tmp_path, fake_run, lambda *_: None)


# ---- the Slurm job array, as sbatch receives it ----

FAKE_SBATCH = """#!/bin/sh
cp "$1" "$(dirname "$0")/submitted.sh"
echo "Submitted batch job 4242"
"""


def test_the_2023_layout_is_one_array_task_per_gpu_with_3_rows(tmp_path, monkeypatch):
    """23 rows at 3 per GPU: 8 array tasks of 1 GPU and 3 x 4 CPUs, at most 8 running, requeued on timeout."""
    submitit = pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit checks that it is on a Slurm login node
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    from tunelab.study.cli import build_parser

    ns = build_parser().parse_args([str(REPO / "examples/study_2023_04_24.yaml"), "--executor", "slurm",
                                    "--partition", "a100", "--rows_per_gpu", "3", "--time", "6:00:00",
                                    "--max_parallel", "8", "--slurm_param", "account=proj", "--mem_gb", "40"])
    executor = executors.from_args(ns, tmp_path)
    from tunelab.study.spec import expand, load_spec

    spec = load_spec(REPO / "examples/study_2023_04_24.yaml")
    plans = expand(spec, spec.default_scale, tmp_path)
    jobs, groups = executor.submit(plans, tmp_path, None)
    assert len(plans) == 23 and [len(g) for g in groups] == [3] * 7 + [2]
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(8)]
    sbatch = (bin_dir / "submitted.sh").read_text()
    for line in ("--array=0-7%8", "--gpus-per-node=1", "--cpus-per-task=12", "--partition=a100", "--time=360",
                 "--mem=120GB", "--account=proj", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert isinstance(jobs[0], submitit.SlurmJob)


def test_a_row_on_several_gpus_runs_its_stages_under_torchrun(tmp_path, monkeypatch):
    """TorchrunStage writes the stage's options to a config file `tunelab train` reads back unchanged,
    launches torchrun with one process per GPU and returns the stage's results file."""
    from tunelab.hparams import parse_args

    _, plans = tiny_plans(tmp_path)
    stage, cfg = plans[1].stages()[0]
    args = parse_args(config=cfg)
    seen = {}

    def fake_torchrun(cmd, **_):
        seen["cmd"] = cmd
        relaunched = parse_args([cmd[-1]])  # what each torchrun process parses
        seen["same"] = relaunched.to_dict() == args.to_dict()
        out = Path(relaunched.training.output_dir)
        out.mkdir(parents=True)
        (out / "train_results.json").write_text(json.dumps({"train_loss": 1.5}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(executors.subprocess, "run", fake_torchrun)
    assert Resources(gpus_per_row=4).stage_fn(None)(args) == {"train_loss": 1.5}
    assert seen["cmd"][:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                               "-m"] and seen["cmd"][7:9] == ["tunelab", "train"]
    assert seen["same"]
    assert Resources(gpus_per_row=1).stage_fn(None) is None  # one GPU: the stage runs in the row's process


# ---- options ----

@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("30:00", 30), ("30:30", 31), ("4:00:00", 240), ("1-12", 2160), ("1-00:00:00", 1440), ("2-1:30", 2970),
])
def test_slurm_time_formats(text, minutes):
    assert executors.parse_time(text) == minutes


@pytest.mark.parametrize("argv, message", [
    (["--executor", "local", "--partition", "gpu"], r"--partition \(slurm\)"),
    (["--executor", "slurm", "--workers", "4"], r"--workers \(local\)"),
    (["--executor", "ray", "--time", "1:00:00"], r"--time \(slurm\)"),
    (["--executor", "slurm", "--time", "soon"], "H:MM:SS"),
    (["--executor", "slurm", "--slurm_param", "account"], "KEY=VALUE"),
    (["--executor", "ray", "--rows_per_gpu", "3", "--gpus_per_row", "2"], "--gpus_per_row 1"),
    (["--executor", "kubernetes"], "choose from 'local', 'slurm', 'ray'"),
])
def test_bad_executor_options_fail_naming_the_valid_ones(tmp_path, argv, message):
    from tunelab.study.cli import build_parser

    with pytest.raises(TunelabError, match=message):
        executors.from_args(build_parser().parse_args(["spec.yaml", *argv]), tmp_path)


def test_local_executor_from_devices():
    from tunelab.study.cli import build_parser

    ns = build_parser().parse_args(["spec.yaml", "--devices", "cuda:0,cuda:1"])
    assert executors.from_args(ns, Path(".")) == LocalExecutor(2, ["cuda:0", "cuda:1"])
    ns = build_parser().parse_args(["spec.yaml", "--workers", "6", "--devices", "cuda:0,cuda:1"])
    assert executors.from_args(ns, Path(".")).workers == 6  # 3 rows per GPU on one machine
    assert Resources(rows_per_gpu=3).gpus_per_task == pytest.approx(1 / 3)
