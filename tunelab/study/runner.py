"""Run a study's rows: each row trains, then evaluates on every eval set, into its own run directory.

    study_dir/
      spec.yaml, plan.json          the spec as given and the expanded plan (what the report reads)
      study.log                     one line per finished row, with the ETA
      rows/r07_freeze_qkv_first3_s42/
        row.json                    status (running/done/failed/interrupted), error + traceback, timings
        row.log                     the row's log records
        train/ persona/ general/    ordinary tunelab run dirs (tunelab_args.json, results, predictions)
        trajectory/<set>/step-<N>/  with `eval_every: N`: likelihood-only evals of each checkpoint
                                    (tunelab/study/trajectory.py)

A finished row is never redone: a rerun skips rows whose row.json says done, and inside an unfinished
row skips stages whose results file exists and reads whole. A half-finished training stage resumes from
its newest complete `checkpoint-*` folder, otherwise it restarts clean. A failed row records its error and
the study goes on. Every start checks the row files: an unreadable row.json, or a done row whose results
files do not read, is run again (with a warning). SIGINT / SIGTERM stop the running row after its current
training step (tunelab/signals.py), mark it "interrupted" and end the study; rerunning resumes it.
`workers > 1` runs rows in parallel processes, one device each when devices are given. Slurm and Ray
(tunelab/study/executors.py) run the same `run_row` on other machines, so every executor leaves the
same files and any of them can resume a study another one started.

`run_fn(args) -> metrics` runs one stage; the default is `tunelab.train.run`, imported only when a row
runs, so this module imports without torch and tests pass a fake. A run_fn with an `evals(args_list)`
attribute (the default: tunelab.train.run_evals) gets a row's eval stages in one call, so they share one
model load and one generation; row.json then shares the call's time among them by their own runtimes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import integrity, signals
from tunelab.errors import TunelabError
from tunelab.names import PLAN_FILE, ROW_FILE, SPEC_FILE, results_file
from tunelab.study import trajectory
from tunelab.study.files import number, read_json_object
from tunelab.study.progress import Progress, end_session, start_session
from tunelab.study.spec import RowPlan

logger = logging.getLogger(__name__)

RESULT_FILES = {"train": results_file("train"), "eval": results_file("predict")}  # written last by each stage

RunFn = Callable[[Any], dict]


def default_run_fn(args) -> dict:
    from tunelab.train import run

    return run(args)


def _default_run_evals(args_list: list) -> list[dict]:
    from tunelab.train import run_evals

    return run_evals(args_list)


# a run_fn with an `evals(args_list) -> [metrics]` attribute runs a row's eval stages in one call (one model
# load, one generation for every set: tunelab/evaluate.py run_evals); without it, one call per stage
default_run_fn.evals = _default_run_evals


# ---- files ----

def _write_json(path: Path, data: Any) -> None:
    """Write through a temp file and rename, so a kill never leaves half a JSON file."""
    integrity.write_json(path, data)


def read_row(row_dir: Path) -> dict[str, Any]:
    """row.json as a dict; {} when there is none. An unreadable one (a disk fault, a hand edit) also reads
    as {} with a warning: the row runs again, keeping the stages whose results files are whole."""
    path = Path(row_dir) / ROW_FILE
    if not path.is_file():
        return {}
    data = integrity.read_json(path)
    if not isinstance(data, dict):
        logger.warning("%s is unreadable: the row runs again (its finished stages are kept)", path)
        return {}
    return data


def _finished(out: Path, kind: str) -> bool:
    """Whether a stage's results file (written last, atomically) is there and whole."""
    return bool(read_json_object(out / RESULT_FILES[kind]))


def check_row_files(plans: list[RowPlan], study_dir: Path, log: Callable[[str], None]) -> None:
    """On every start: a row marked done whose results files are unreadable is redone. The unreadable files
    are removed so exactly those stages run again (and, for a training stage, the evals after it)."""
    for plan in plans:
        row_dir = study_dir / plan.dir
        record = read_row(row_dir)
        if record.get("status") != "done":
            continue
        bad = [Path(cfg["output_dir"]) / RESULT_FILES["train" if stage == "train" else "eval"]
               for stage, cfg in plan.stages()
               if not _finished(Path(cfg["output_dir"]), "train" if stage == "train" else "eval")]
        if not bad:
            continue
        log(f"warning: {plan.dir} was done but {', '.join(str(b.relative_to(row_dir)) for b in bad)} "
            "is missing or unreadable: redoing those stages")
        for path in bad:
            path.unlink(missing_ok=True)
        _write_json(row_dir / ROW_FILE, {**record, "status": "pending", "error": "results files unreadable"})


def write_plan(study_dir: Path, plans: list[RowPlan], meta: dict[str, Any], spec_text: str | None) -> None:
    """plan.json (the expanded plan the report reads) and spec.yaml (the spec as given)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    if spec_text is not None:
        (study_dir / SPEC_FILE).write_text(spec_text, encoding="utf-8")
    _write_json(study_dir / PLAN_FILE, {**meta, "rows": [p.to_dict() for p in plans]})


def check_resumable(plans: list[RowPlan], study_dir: Path) -> None:
    """Refuse to mix plans: a done row computed with other options would be silently kept otherwise."""
    records = {p.dir: read_row(study_dir / p.dir) for p in plans}
    stale = [p.dir for p in plans
             if records[p.dir].get("status") == "done" and records[p.dir].get("fingerprint") != p.fingerprint()]
    if stale:
        raise TunelabError(
            f"{study_dir} holds finished rows computed with different options ({', '.join(stale[:4])}"
            f"{' ...' if len(stale) > 4 else ''}): use another --output_dir, or delete those row folders to redo them")


# ---- one row ----

def run_row(plan: RowPlan, study_dir: str | Path, run_fn: RunFn | None = None) -> dict[str, Any]:
    """Train + evaluate one row unless row.json says done; returns its row record. Never raises for a
    failing stage (the error goes into row.json); KeyboardInterrupt is recorded and re-raised."""
    row_dir = Path(study_dir) / plan.dir
    record = read_row(row_dir)
    if record.get("status") == "done":
        return {**record, "skipped": True}
    if record.get("fingerprint") not in (None, plan.fingerprint()):
        _discard_stages(plan, record, row_dir)  # an unfinished attempt with other options: nothing of it is reusable
    record = {"id": plan.id, "name": plan.name, "seed": plan.seed, "labels": plan.labels, "dir": plan.dir,
              "fingerprint": plan.fingerprint(), "attempts": record.get("attempts", 0) + 1,
              "stages": record.get("stages", {}), "status": "running", "error": None, "traceback": None,
              "host": socket.gethostname(), "pid": os.getpid(), "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(row_dir / ROW_FILE, record)
    start = time.time()
    try:
        with signals.graceful(), _row_log(row_dir / "row.log"):
            _run_stages(plan, record, row_dir, run_fn or default_run_fn)
        record["status"] = "done"
    except KeyboardInterrupt as err:  # Ctrl-C, or a signal (signals.Interrupted)
        _mark_running(record, "interrupted")
        record.update(status="interrupted", error=f"{err or 'interrupted (Ctrl-C)'}: rerun the study to continue")
        raise
    except Exception as err:  # a failed row must not stop the study: record it and move on
        _mark_running(record, "failed")
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        logger.error("row %s failed: %s", plan.dir, record["error"])
    finally:
        record.update(seconds=round(time.time() - start, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_json(row_dir / ROW_FILE, record)
    return record


def _discard_stages(plan: RowPlan, record: dict[str, Any], row_dir: Path) -> None:
    for _, cfg in plan.stages():
        shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    shutil.rmtree(row_dir / trajectory.TRAJECTORY_DIR, ignore_errors=True)
    record["stages"] = {}


def _mark_running(record: dict[str, Any], status: str) -> None:
    for info in record["stages"].values():
        if info.get("status") == "running":
            info["status"] = status


def _run_stages(plan: RowPlan, record: dict[str, Any], row_dir: Path, run_fn: RunFn) -> None:
    trained_now, evals = False, []
    for stage, cfg in plan.stages():  # training first, then the eval sets
        kind = "train" if stage == "train" else "eval"
        out = Path(cfg["output_dir"])
        if _finished(out, kind) and not (kind == "eval" and trained_now):
            record["stages"].setdefault(stage, {})["status"] = "done"
            continue  # finished in an earlier attempt
        if kind == "eval":
            evals.append((stage, cfg))
            continue
        signals.check()  # a signal since the last stage: stop here, the row is marked interrupted
        before = record["stages"].get(stage, {})
        avoid = before.get("resumed_from") if before.get("status") == "failed" else None
        cfg = _prepare_stage_dir(out, cfg, kind, avoid)
        record["stages"][stage] = {"status": "running", "resumed_from": cfg.get("resume_from_checkpoint")}
        _write_json(row_dir / ROW_FILE, record)
        start = time.time()
        metrics = run_fn(_parse(cfg))
        record["stages"][stage].update(status="done", seconds=round(time.time() - start, 1), metrics=_jsonable(metrics))
        _write_json(row_dir / ROW_FILE, record)
        trained_now = True
    if evals:
        _run_evals(evals, record, row_dir, run_fn)
    if plan.eval_every and plan.train:
        _run_trajectory(plan, record, row_dir, run_fn, trained_now)


def _run_evals(evals: list[tuple[str, dict[str, Any]]], record: dict[str, Any], row_dir: Path, run_fn: RunFn) -> None:
    """The row's eval stages still to run: in one call where run_fn has `evals` (each stage's seconds are then
    the call's time shared by the stages' own runtimes, and row.json names the stages run with it), else one
    call each."""
    together = len(evals) > 1 and hasattr(run_fn, "evals")
    groups = [evals] if together else [[e] for e in evals]
    for group in groups:
        signals.check()
        cfgs = [_prepare_stage_dir(Path(cfg["output_dir"]), cfg, "eval") for _, cfg in group]
        for stage, _ in group:
            record["stages"][stage] = {"status": "running", "resumed_from": None}
        _write_json(row_dir / ROW_FILE, record)
        start = time.time()
        args = [_parse(cfg) for cfg in cfgs]
        results = run_fn.evals(args) if together else [run_fn(args[0])]
        seconds = time.time() - start
        names = [stage for stage, _ in group]
        for (stage, _), metrics, share in zip(group, results, _shares(results)):
            info = record["stages"][stage]
            info.update(status="done", seconds=round(seconds * share, 1), metrics=_jsonable(metrics))
            if together:
                info["run_with"] = [name for name in names if name != stage]
        _write_json(row_dir / ROW_FILE, record)


def _shares(results: list[Any]) -> list[float]:
    """Each stage's share of a call that ran them all: its own `*_runtime` metric over their sum; equal shares
    where one did not report it."""
    runtimes = [number(m.get("predict_runtime", m.get("eval_runtime"))) if isinstance(m, dict) else None
                for m in results]
    if any(r is None or r < 0 for r in runtimes) or sum(runtimes) <= 0:
        return [1.0 / len(results)] * len(results)
    return [r / sum(runtimes) for r in runtimes]


def _run_trajectory(plan: RowPlan, record: dict[str, Any], row_dir: Path, run_fn: RunFn, retrained: bool) -> None:
    """Score the row's checkpoints (tunelab/study/trajectory.py); timed like a stage, in row.json."""
    record["stages"]["trajectory"] = {"status": "running"}
    _write_json(row_dir / ROW_FILE, record)
    start = time.time()
    counts = trajectory.run_points(plan.evals, row_dir, lambda cfg: run_fn(_parse(cfg)), retrained)
    record["stages"]["trajectory"] = {"status": "done", "seconds": round(time.time() - start, 1), **counts}
    _write_json(row_dir / ROW_FILE, record)


def _prepare_stage_dir(out: Path, cfg: dict[str, Any], kind: str, avoid: str | None = None) -> dict[str, Any]:
    """Resume training from the newest checkpoint-* in `out`; otherwise clear a half-written stage dir
    (its files belong to an attempt that did not finish, or to a training run that has been redone).
    `avoid`: a checkpoint the last attempt failed to resume from (say, half-written by a kill during
    saving); resuming from it again would fail forever, so the stage restarts clean instead."""
    if kind == "train":
        ckpt = latest_checkpoint(out)
        if ckpt is not None and str(ckpt) != avoid:
            logger.info("resuming %s from %s", out, ckpt.name)
            return {**cfg, "resume_from_checkpoint": str(ckpt)}
        if ckpt is not None:
            logger.warning("the last attempt failed resuming from %s: restarting %s from scratch", ckpt.name, out)
    if out.exists():
        shutil.rmtree(out)
    return cfg


def latest_checkpoint(out: Path) -> Path | None:
    """The whole `checkpoint-<step>` folder with the highest step (tunelab/integrity.py), or None."""
    found = integrity.complete_checkpoints(out)
    return found[-1][1] if found else None


def _parse(cfg: dict[str, Any]):
    from tunelab.hparams import parse_args

    return parse_args(config=cfg)


def _jsonable(metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


@contextmanager
def _row_log(path: Path):
    """Send this process's log records to the row's own row.log while the row runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO))  # NOTSET (0) already lets everything through
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


# ---- the whole study ----

def default_calibrate(plans: list[RowPlan], devices: int) -> dict[str, Any]:
    from tunelab.study.calibrate import calibrate

    return calibrate(plans, devices)


def default_peak(precision: str) -> float:
    from tunelab.study.calibrate import measure_peak

    return measure_peak(precision)


def run_study(plans: list[RowPlan], study_dir: str | Path, run_fn: RunFn | None = None, workers: int = 1,
              devices: list[str] | None = None, log: Callable[[str], None] | None = None,
              executor=None, calibrate: Callable[[list[RowPlan], int], dict[str, Any]] | None = None,
              measure_peak: Callable[[str], float] | None = None) -> list[dict[str, Any]]:
    """Run every plan not yet done (base row first); returns the row records in plan order. `executor`
    (tunelab/study/executors.py) runs the rows elsewhere; by default they run here on `workers` processes.
    `calibrate(plans, devices)` measures this machine for the efficiency figures and the early ETA
    (tunelab/study/calibrate.py); by default it runs when the rows run here with the real stages, and then
    `measure_peak(precision)` measures the matmul peak again when the session ends (efficiency.json)."""
    study_dir = Path(study_dir)
    log = log or _study_logger(study_dir)
    check_resumable(plans, study_dir)
    check_row_files(plans, study_dir, log)
    todo = [p for p in plans if read_row(study_dir / p.dir).get("status") != "done"]
    where = executor.describe() if executor is not None else (f"{workers} workers" if workers > 1 else "")
    log(f"study {study_dir}: {len(plans)} rows, {len(plans) - len(todo)} already done, {len(todo)} to run"
        + (f" on {where}" if where else ""))
    here = executor is None or getattr(executor, "runs_here", False)
    if calibrate is None and run_fn is None and here and todo:
        calibrate, measure_peak = default_calibrate, measure_peak or default_peak
    used = getattr(executor, "devices", None) if executor is not None else devices
    budget = start_session(study_dir, plans, todo, calibrate, len(set(used or [])) or 1, log)
    progress = Progress(todo, executor.parallelism(len(todo)) if executor is not None else workers, log, budget,
                        study_dir)
    finished = False
    try:
        with signals.graceful():  # SIGINT/SIGTERM: the running row stops cleanly and is marked interrupted
            if executor is not None:
                executor.run(todo, study_dir, run_fn, progress.update)
            else:
                run_rows(todo, study_dir, run_fn, workers, devices, progress.update)
        finished = True
    finally:  # a stopped session ends at once, without measuring the peak again
        end_session(study_dir, progress, measure_peak if finished else None)
    return [read_row(study_dir / p.dir) for p in plans]


def run_rows(todo: list[RowPlan], study_dir: Path, run_fn: RunFn | None, workers: int, devices: list[str] | None,
             on_done: Callable[[RowPlan, dict[str, Any]], None]) -> None:
    """Run `todo` on this machine, one at a time or on `workers` processes; on_done(plan, record) per row."""
    if workers <= 1 or len(todo) <= 1:
        for plan in todo:
            signals.check()
            on_done(plan, run_row(plan, study_dir, run_fn))
    else:
        _run_parallel(todo, study_dir, run_fn, workers, devices, on_done)


def _study_logger(study_dir: Path) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(line, flush=True)
        study_dir.mkdir(parents=True, exist_ok=True)
        with (study_dir / "study.log").open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    return log


def worker_devices(workers: int, devices: list[str] | None) -> list[str | None]:
    """The device each worker process gets: devices round-robin (several rows per GPU when workers >
    devices, as the 2023 grid ran 3 per GPU), or None each when no devices are given."""
    if not devices:
        return [None] * workers
    return [devices[i % len(devices)] for i in range(workers)]


def _init_worker(queue, threads: int) -> None:
    """Runs first in each worker process, before torch is imported: pin its device and its CPU threads."""
    device = queue.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device.split(":")[-1]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def _usable_cpus() -> int:
    """CPUs this process may run on: a Slurm job or a taskset sees fewer than os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_parallel(todo: list[RowPlan], study_dir: Path, run_fn: RunFn | None, workers: int,
                  devices: list[str] | None, on_done: Callable[[RowPlan, dict[str, Any]], None]) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch/CUDA state
    queue = ctx.Queue()
    for device in worker_devices(workers, devices):
        queue.put(device)
    threads = max(1, _usable_cpus() // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, threads)) as pool:
        pending: dict[Future, RowPlan] = {pool.submit(run_row, p, study_dir, run_fn): p for p in todo}
        try:
            _collect(pool, pending, study_dir, on_done)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        signals.check()


def _collect(pool: ProcessPoolExecutor, pending: dict[Future, RowPlan], study_dir: Path,
             on_done: Callable[[RowPlan, dict[str, Any]], None]) -> None:
    """Hand each finished row to on_done. On a signal: rows not started are cancelled, and a SIGTERM is passed
    on to the workers (a terminal's Ctrl-C reaches them itself), whose rows stop cleanly and are recorded."""
    import multiprocessing

    forwarded = False
    while pending:
        finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        if signals.requested() is not None and not forwarded:
            forwarded = True
            pool.shutdown(wait=False, cancel_futures=True)
            if signals.requested() == signal.SIGTERM:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGTERM)
        for future in finished:
            plan = pending.pop(future)
            if future.cancelled():
                continue
            if isinstance(future.exception(), KeyboardInterrupt):  # the worker's row stopped on a signal
                on_done(plan, read_row(study_dir / plan.dir))
            else:
                on_done(plan, _result(future, plan, study_dir))


def _result(future: Future, plan: RowPlan, study_dir: Path) -> dict[str, Any]:
    """A worker's row record; a worker that died (killed, out of memory) is recorded as a failed row."""
    try:
        return future.result()
    except Exception as err:
        return mark_lost(plan, study_dir, f"worker died: {type(err).__name__}: {err}")


def mark_lost(plan: RowPlan, study_dir: Path, error: str) -> dict[str, Any]:
    """Record a row whose process was lost (killed, out of memory, a cluster job that died) as failed,
    unless its row.json says it finished before that; returns the row record."""
    record = read_row(study_dir / plan.dir)
    if record.get("status") == "done":
        return record
    record = {**record, "status": "failed", "error": error}
    _write_json(study_dir / plan.dir / ROW_FILE, record)
    return record
