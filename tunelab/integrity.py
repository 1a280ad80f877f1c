"""Nothing half-written passes for whole: atomic file writes, checkpoint completion markers, run status.

    write_json(path, data), write_text(path, text)   through a temp file beside `path`, renamed when complete
    with atomic_open(path) as f: ...                 the same for a file written in pieces (JSON lines)
    mark_complete(ckpt_dir, step)                    the last file of a checkpoint: every file and its size
    checkpoint_problem(ckpt_dir) -> str | None       why a checkpoint is not whole (None: it is)
    complete_checkpoints(run_dir)                    [(step, path)] of its whole checkpoint-<step> folders
    set_status(out_dir, status, error)               run_status.json: running -> done | failed | interrupted
    with recorded(out_dir): ...                      the same around a block (eval / predict)

A rename inside one folder is atomic on POSIX filesystems: a reader sees the old file or the new one, never
half of one, and a write that fails (disk full, read-only) leaves the old file and no temp file behind.

A Trainer checkpoint is many files written one after another into a folder HF's Trainer names
`checkpoint-<step>` up front (and rotates by that name), so rather than a temp folder it gets a marker
written last, `checkpoint_complete.json`, listing every file with its size. A `checkpoint-<step>` folder
without it (killed, or out of disk, while saving) or with a file of another size (truncated) is not whole:
resume skips it and `--checkpoint_dir` refuses it. Every checkpoint's `tunelab_method.json`
(methods.save_trainable, written after the weights) records the weight files' sizes the same way, which
covers a run's final weights; a run directory whose run_status.json does not say "done" is refused too.

Light on purpose (no torch): the study runner uses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = "checkpoint_complete.json"
STATUS_FILE = "run_status.json"
METHOD_FILE = "tunelab_method.json"  # = methods.METHOD_FILE (kept here so this module imports nothing heavy)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---- atomic files ----

def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path` for writing; renamed to `path` when the block ends without an error,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str))


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- checkpoint completion ----

def file_sizes(folder: str | Path, names: list[str] | None = None) -> dict[str, int]:
    """{relative path: bytes} of `names` in folder, or of every file under it but the marker and temp files."""
    folder = Path(folder)
    if names is not None:
        return {n: (folder / n).stat().st_size for n in names if (folder / n).is_file()}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and ".tmp-" not in p.name}


def mark_complete(folder: str | Path, step: int | None = None) -> None:
    """Write the completion marker: call it after every other file of the checkpoint is written."""
    write_json(Path(folder) / MARKER, {"step": step, "files": file_sizes(folder),
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def size_problem(folder: Path, sizes: Any, record: str) -> str | None:
    """Why the files `sizes` lists ({name: bytes}, read from `record`) are not as saved; None when they are."""
    if not isinstance(sizes, dict):
        return f"its {record} is unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when saved (truncated or changed)"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a whole checkpoint, in a few words; None when nothing says it is not.

    A run dir whose run_status.json is not "done", a `checkpoint-<step>` folder without its marker, a file
    whose size differs from the one recorded (marker or tunelab_method.json). Folders written before
    these records existed pass unless they are Trainer checkpoints."""
    folder = Path(folder)
    status = read_json(folder / STATUS_FILE)
    if isinstance(status, dict) and status.get("status") != "done":
        return f"the run writing it did not finish (run_status.json: {status.get('status')})"
    if _CHECKPOINT.match(folder.name) or (folder / MARKER).exists():
        marker = read_json(folder / MARKER)
        if marker is None:
            return (f"it was not saved to the end (no readable {MARKER}: the run was stopped or ran out of disk "
                    "while saving it)")
        problem = size_problem(folder, marker.get("files") if isinstance(marker, dict) else None, MARKER)
        if problem:
            return problem
    method = read_json(folder / METHOD_FILE)
    if isinstance(method, dict) and "files" in method:
        return size_problem(folder, method["files"], METHOD_FILE)
    return None


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other folder."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-<step>` folder in run_dir, by step, whole or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the whole `checkpoint-<step>` folders in run_dir, by step."""
    return [(step, p) for step, p in checkpoint_folders(run_dir) if checkpoint_problem(p) is None]


# ---- run status ----

def set_status(out_dir: str | Path, status: str, error: str | None = None, **extra: Any) -> None:
    """run_status.json: "running" while a run works in out_dir, then "done", "failed" (with the error) or
    "interrupted". A "running" left behind by a run that no longer runs means it was killed."""
    path = Path(out_dir) / STATUS_FILE
    before = read_json(path)
    started = before.get("started") if isinstance(before, dict) and status != "running" else None
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, {"status": status, "error": error, "pid": os.getpid(), "started": started or now,
                      "updated": now, **extra})


def mark_ended(out_dir: str | Path, status: str, error: str | None) -> None:
    """Record how this process's run in out_dir ended ("failed" / "interrupted" with the error) when this
    process marked it running; a run that stopped before writing anything leaves nothing. A write that fails
    too (the disk that failed the run) is logged: the run's own error is the one to report."""
    before = read_status(out_dir)
    if before.get("status") == "running" and before.get("pid") == os.getpid():
        try:
            set_status(out_dir, status, error)
        except OSError as err:
            logging.getLogger(__name__).warning("could not record the run as %s in %s: %s", status, out_dir, err)


@contextmanager
def recorded(out_dir: str | Path, main: bool = True, **extra: Any) -> Iterator[None]:
    """run_status.json around a block that runs in out_dir: "running" now, "done" when the block ends, or
    "interrupted" / "failed" with the error when it raises (re-raised). `main`: this process writes run files
    (rank 0); the other ranks write nothing."""
    if main:
        set_status(out_dir, "running", **extra)
    try:
        yield
    except KeyboardInterrupt as err:  # Ctrl-C, or a signal (tunelab/signals.py)
        if main:
            mark_ended(out_dir, "interrupted", str(err) or "interrupted (Ctrl-C)")
        raise
    except BaseException as err:
        if main:
            mark_ended(out_dir, "failed", f"{type(err).__name__}: {err}")
        raise
    if main:
        set_status(out_dir, "done")


def read_status(out_dir: str | Path) -> dict[str, Any]:
    data = read_json(Path(out_dir) / STATUS_FILE)
    return data if isinstance(data, dict) else {}
