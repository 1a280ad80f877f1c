"""Where a study's rows run: this machine (local), a Slurm cluster (through submitit) or a Ray cluster.

    tunelab study SPEC.yaml --workers 24 --devices cuda:0,cuda:1,...,cuda:7    # local: 3 rows per GPU
    tunelab study SPEC.yaml --executor slurm --partition gpu --rows_per_gpu 3 --time 4:00:00
    tunelab study SPEC.yaml --executor ray --ray_address auto --rows_per_gpu 3

Every executor runs a row through `runner.run_row`, the one function that writes a row's directory, so a
study dir looks the same whichever executor filled it: a study started on Slurm resumes locally or on
Ray, and the report reads the same files. On a cluster the study dir must be on a file system that
every node sees (and the tunelab environment too: jobs run this Python interpreter).

- slurm: one array job; each array task is one GPU slot running `rows_per_gpu` rows side by side
  (the 2023 grid ran 3 rows per A100), or one row on `gpus_per_row` GPUs. A task that reaches its time
  limit (or is preempted, where the cluster signals it) is requeued by submitit and its rows resume
  from their newest checkpoints.
- ray: one task per row asking for `cpus_per_row` CPUs and `gpus_per_row / rows_per_gpu` GPUs; each
  row gets a fresh worker process (max_calls=1), so GPU memory is returned between rows.
A row on several GPUs runs each stage under torchrun (DDP), one process per GPU (`TorchrunStage`).

An executor has `parallelism(rows)` (for the ETA), `describe()` and `run(todo, study_dir, run_fn, on_done)`,
which runs every plan in `todo` and calls on_done(plan, record) as each row finishes. submitit and ray are
imported only when their executor runs (`pip install tunelab[scale]`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.names import results_file
from tunelab.study import runner
from tunelab.study.spec import RowPlan

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "ray")
DEFAULT_TIME = "4:00:00"  # one job's wall-clock limit unless --time says otherwise
OnDone = Callable[[RowPlan, dict[str, Any]], None]


# ---- what a row asks for ----

@dataclass(frozen=True)
class Resources:
    """What one row asks a cluster for."""

    gpus_per_row: int = 1
    rows_per_gpu: int = 1
    cpus_per_row: int = 4

    def __post_init__(self) -> None:
        if self.gpus_per_row < 0 or self.rows_per_gpu < 1 or self.cpus_per_row < 1:
            raise TunelabError(f"need --gpus_per_row >= 0, --rows_per_gpu >= 1, --cpus_per_row >= 1; got {self}")
        if self.rows_per_gpu > 1 and self.gpus_per_row != 1:
            raise TunelabError(f"--rows_per_gpu {self.rows_per_gpu} shares one GPU between rows: it needs "
                               f"--gpus_per_row 1, got {self.gpus_per_row}")

    @classmethod
    def from_args(cls, ns) -> Resources:
        names = ("gpus_per_row", "rows_per_gpu", "cpus_per_row")
        return cls(**{k: getattr(ns, k) for k in names if getattr(ns, k) is not None})

    @property
    def gpus_per_task(self) -> float:
        """A row's share of GPUs (1/3 for 3 rows per GPU): Ray's fractional GPU request."""
        return self.gpus_per_row / self.rows_per_gpu

    def stage_fn(self, run_fn: runner.RunFn | None) -> runner.RunFn | None:
        """Rows on several GPUs launch each stage under torchrun; otherwise the stage runs in the row's process."""
        return TorchrunStage(self.gpus_per_row) if run_fn is None and self.gpus_per_row > 1 else run_fn


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time(text: str) -> int:
    """A Slurm time limit in whole minutes (rounded up): 90, 30:00 (MM:SS), 4:00:00, 1-12, 1-12:00:00."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise TunelabError(f"--time '{text}': use minutes, MM:SS, H:MM:SS, D-HH or D-HH:MM:SS (Slurm's formats)")
    days, a, b, c = (int(m[g]) if m[g] else None for g in ("d", "a", "b", "c"))
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # M or M:SS
        seconds = a * 60 + (b or 0)
    return max(1, -(-seconds // 60))


def parse_params(items: list[str]) -> dict[str, str]:
    """['account=proj', 'qos=high'] -> {'account': 'proj', 'qos': 'high'} (sbatch option names)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"--slurm_param expects KEY=VALUE (an sbatch option), got '{item}'")
        out[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return out


# ---- options: defined once here, added to `tunelab study` by add_arguments ----

@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    executors: tuple[str, ...]
    type: Any = str
    repeat: bool = False


OPTIONS = (
    Option("--partition", "Slurm partition (default: the cluster's default partition)", ("slurm",)),
    Option("--time", f"time limit of one Slurm job: minutes, H:MM:SS or D-HH:MM:SS (default {DEFAULT_TIME})",
           ("slurm",)),
    Option("--gpus_per_row", "GPUs one row trains on (0: CPUs only); > 1 runs each stage under torchrun "
           f"(default {Resources.gpus_per_row})", ("slurm", "ray"), int),
    Option("--rows_per_gpu", "rows sharing one GPU, as the 2023 grid ran 3 per A100 "
           f"(default {Resources.rows_per_gpu})",
           ("slurm", "ray"), int),
    Option("--cpus_per_row", f"CPU cores one row asks for (default {Resources.cpus_per_row})", ("slurm", "ray"), int),
    Option("--mem_gb", "memory one row asks for, in GB (default: the partition's default)", ("slurm",), float),
    Option("--max_parallel", "Slurm array tasks running at once (default: no limit)", ("slurm",), int),
    Option("--slurm_param", "any other sbatch option as KEY=VALUE, e.g. account=proj or qos=high (repeatable)",
           ("slurm",), repeat=True),
    Option("--ray_address", "Ray cluster to join, e.g. auto or ray://head:10001 (default: start Ray on this machine)",
           ("ray",)),
)


def add_arguments(parser) -> None:
    """Add --executor and the executor options to `tunelab study`'s parser (all default to 'not given')."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where rows run: local (this machine), slurm (submitit) or ray (default local)")
    for opt in OPTIONS:
        if opt.repeat:
            parser.add_argument(opt.flag, action="append", default=None, metavar="KEY=VALUE", help=opt.help)
        else:
            parser.add_argument(opt.flag, type=opt.type, default=None, help=opt.help)


def check_options(ns) -> None:
    """Refuse an option the chosen executor would silently ignore, naming the executors it applies to."""
    given = {o.flag[2:]: o.executors for o in OPTIONS if getattr(ns, o.flag[2:], None) is not None}
    if ns.workers != 1:
        given["workers"] = ("local",)
    if ns.devices:
        given["devices"] = ("local",)
    wrong = sorted(name for name, where in given.items() if ns.executor not in where)
    if wrong:
        names = ", ".join(f"--{n} ({'/'.join(given[n])})" for n in wrong)
        raise TunelabError(f"--executor {ns.executor} does not use {names}: drop them or pick that executor")


def from_args(ns, study_dir: Path):
    """The executor `tunelab study`'s options ask for."""
    check_options(ns)
    if ns.executor == "local":
        devices = [d.strip() for d in ns.devices.split(",")] if ns.devices else None
        workers = max(ns.workers, 1) if not devices or ns.workers > 1 else len(devices)
        return LocalExecutor(workers, devices)
    res = Resources.from_args(ns)
    if ns.executor == "slurm":
        return SlurmExecutor(Path(study_dir) / "slurm", res, partition=ns.partition,
                             timeout_min=parse_time(ns.time or DEFAULT_TIME), mem_gb=ns.mem_gb,
                             max_parallel=ns.max_parallel, params=parse_params(ns.slurm_param or []))
    return RayExecutor(res, address=ns.ray_address)


# ---- local ----

@dataclass
class LocalExecutor:
    """Rows on this machine: one at a time, or on `workers` processes pinned round-robin to `devices`."""

    workers: int = 1
    devices: list[str] | None = None
    runs_here = True  # the study's calibration (peak, ETA) measures this machine

    def parallelism(self, rows: int) -> int:
        return min(self.workers, max(rows, 1))

    def describe(self) -> str:
        return f"{self.workers} workers" if self.workers > 1 else ""

    def run(self, todo: list[RowPlan], study_dir: Path, run_fn: runner.RunFn | None, on_done: OnDone) -> None:
        runner.run_rows(todo, Path(study_dir), run_fn, self.workers, self.devices, on_done)


# ---- Slurm through submitit ----

def group_rows(todo: list[RowPlan], size: int) -> list[list[RowPlan]]:
    """Consecutive groups of `size` rows: the rows one Slurm array task runs side by side."""
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def slurm_parameters(res: Resources, rows: int, partition: str | None, timeout_min: int, mem_gb: float | None,
                     max_parallel: int | None, params: dict[str, str], name: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters for array tasks that each run `rows` rows on one node."""
    out: dict[str, Any] = {"name": name, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": res.gpus_per_row,
                           "cpus_per_task": res.cpus_per_row * rows, "timeout_min": timeout_min}
    if mem_gb is not None:
        out["mem_gb"] = mem_gb * rows
    if partition:
        out["slurm_partition"] = partition
    if max_parallel:
        out["slurm_array_parallelism"] = max_parallel
    if params:
        out["slurm_additional_parameters"] = dict(params)
    return out


class SlurmRows:
    """What one Slurm array task runs: its rows side by side through the local runner (they share the
    task's GPU). submitit calls `checkpoint` when Slurm is about to stop the task (time limit,
    preemption) and requeues it; the rows then resume from what run_row left on disk."""

    def __init__(self, study_dir: Path, run_fn: runner.RunFn | None):
        self.study_dir, self.run_fn = Path(study_dir), run_fn

    def __call__(self, plans: list[RowPlan]) -> list[dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        runner.run_rows(plans, self.study_dir, self.run_fn, len(plans), None,
                        lambda plan, record: records.__setitem__(plan.dir, record))
        return [records[p.dir] for p in plans]

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@dataclass
class SlurmExecutor:
    """Rows as one Slurm job array (submitit). `cluster` is submitit's: "slurm" submits with sbatch,
    "local" runs the very same pickled jobs as processes on this machine (tests)."""

    folder: Path
    resources: Resources = field(default_factory=Resources)
    partition: str | None = None
    timeout_min: int = field(default_factory=lambda: parse_time(DEFAULT_TIME))
    mem_gb: float | None = None
    max_parallel: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    cluster: str | None = "slurm"
    poll_s: float = 30.0

    def parallelism(self, rows: int) -> int:
        return min(rows, self.max_parallel * self.resources.rows_per_gpu) if self.max_parallel else rows

    def describe(self) -> str:
        r = self.resources
        share = f"{r.rows_per_gpu} rows per GPU" if r.rows_per_gpu > 1 else f"{r.gpus_per_row} GPU(s) per row"
        return f"slurm{f' partition {self.partition}' if self.partition else ''} ({share})"

    def submit(self, todo: list[RowPlan], study_dir: Path, run_fn: runner.RunFn | None):
        """Submit `todo` as one job array; returns (jobs, groups): the rows of jobs[i] are groups[i]."""
        submitit = _require("submitit", "slurm")
        if self.cluster == "slurm" and not shutil.which("sbatch"):
            raise TunelabError("--executor slurm: sbatch not found; run tunelab study on a Slurm login node")
        groups = group_rows(todo, self.resources.rows_per_gpu)
        executor = submitit.AutoExecutor(folder=str(Path(self.folder) / "%j"), cluster=self.cluster)
        executor.update_parameters(**slurm_parameters(
            self.resources, len(groups[0]), self.partition, self.timeout_min, self.mem_gb, self.max_parallel,
            self.params, f"tunelab-{Path(study_dir).name}"))
        jobs = executor.map_array(SlurmRows(study_dir, self.resources.stage_fn(run_fn)), groups)
        logger.info("submitted %d Slurm array tasks (%s)", len(jobs), jobs[0].job_id if jobs else "-")
        return jobs, groups

    def run(self, todo: list[RowPlan], study_dir: Path, run_fn: runner.RunFn | None, on_done: OnDone) -> None:
        if not todo:
            return
        from submitit.helpers import as_completed

        jobs, groups = self.submit(todo, study_dir, run_fn)
        by_job = {j.job_id: g for j, g in zip(jobs, groups)}
        try:
            for job in as_completed(jobs, poll_frequency=self.poll_s):
                group = by_job[job.job_id]
                for plan, record in zip(group, _job_records(job, group, Path(study_dir))):
                    on_done(plan, record)
        except KeyboardInterrupt:
            print(f"interrupted: the Slurm jobs keep running (scancel {jobs[0].job_id.split('_')[0]} stops them); "
                  "rerun the study once they end to collect the rest", file=sys.stderr)
            raise


def _job_records(job, group: list[RowPlan], study_dir: Path) -> list[dict[str, Any]]:
    """The row records a finished job returned; rows of a job that died are marked failed."""
    try:
        return job.result()
    except Exception as err:  # the job died (node failure, out of memory, cancelled): its rows failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return [runner.mark_lost(p, study_dir, f"slurm job {job.job_id} failed: {type(err).__name__}: {first}"[:500])
                for p in group]


# ---- Ray ----

@dataclass
class RayExecutor:
    """One Ray task per row. Joins `address` (a running cluster), or starts Ray on this machine when
    Ray is not running yet; a Ray it started is shut down at the end."""

    resources: Resources = field(default_factory=Resources)
    address: str | None = None

    def parallelism(self, rows: int) -> int:
        return rows  # Ray starts rows as resources free up; how many fit is known only once it runs

    def describe(self) -> str:
        return f"ray ({self.resources.cpus_per_row} CPUs, {self.resources.gpus_per_task:g} GPU per row)"

    def run(self, todo: list[RowPlan], study_dir: Path, run_fn: runner.RunFn | None, on_done: OnDone) -> None:
        if not todo:
            return
        ray = _require("ray", "ray")
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address, include_dashboard=False)
            except ConnectionError as err:
                raise TunelabError(f"--ray_address {self.address}: no Ray cluster answers there ({err})") from None
        pending: dict[Any, RowPlan] = {}
        try:
            self._check_fits(ray.cluster_resources())
            task = ray.remote(num_cpus=self.resources.cpus_per_row, num_gpus=self.resources.gpus_per_task,
                              max_calls=1, max_retries=0)(runner.run_row)
            stage_fn = self.resources.stage_fn(run_fn)
            pending = {task.remote(plan, str(study_dir), stage_fn): plan for plan in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                plan = pending.pop(ready[0])
                on_done(plan, _ray_record(ray, ready[0], plan, Path(study_dir)))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()

    def _check_fits(self, cluster: dict[str, float]) -> None:
        """A task no node can hold waits forever in Ray: fail now instead, naming the flag to change."""
        r = self.resources
        if cluster.get("CPU", 0) < r.cpus_per_row:
            raise TunelabError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs, a row asks for "
                               f"{r.cpus_per_row}: lower --cpus_per_row")
        if cluster.get("GPU", 0) < r.gpus_per_task:
            raise TunelabError(f"the Ray cluster has {cluster.get('GPU', 0):g} GPUs, a row asks for "
                               f"{r.gpus_per_task:g}: pass --gpus_per_row 0 to run rows on CPUs")


def _ray_record(ray, ref, plan: RowPlan, study_dir: Path) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except Exception as err:  # the worker died (out of memory, node lost): record the row as failed
        return runner.mark_lost(plan, study_dir, f"ray task failed: {type(err).__name__}: {str(err)[:300]}")


def _require(module: str, executor: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TunelabError(f"--executor {executor} needs the {module} package: pip install 'tunelab[scale]'") from None


# ---- a row on several GPUs: each stage under torchrun ----

def stage_config(args) -> dict[str, Any]:
    """The options a stage was given (what the runner passed in), as a config dict `tunelab train` reads."""
    return {k: v for k, v in args.to_dict().items() if k in args.explicit}


def torchrun_command(config_path: str | Path, nproc: int) -> list[str]:
    """`torchrun --standalone` (its own free port, so several rows share a node) on `tunelab train cfg.json`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "tunelab", "train", str(config_path)]


class TorchrunStage:
    """run_fn that runs a stage as `nproc` DDP processes on this node and returns the stage's results."""

    def __init__(self, nproc: int):
        self.nproc = nproc

    def __call__(self, args) -> dict[str, Any]:
        from tunelab.hparams import check_stage

        stage = check_stage(args.training)
        with tempfile.TemporaryDirectory(prefix="tunelab_stage_") as tmp:
            path = Path(tmp) / "stage.json"
            path.write_text(json.dumps(stage_config(args), default=str), encoding="utf-8")
            done = subprocess.run(torchrun_command(path, self.nproc))
        if done.returncode != 0:
            raise RuntimeError(f"torchrun ({self.nproc} processes) exited with {done.returncode}: its output is in "
                               "the job's log")
        results = Path(args.training.output_dir) / results_file(stage)
        return json.loads(results.read_text(encoding="utf-8"))
