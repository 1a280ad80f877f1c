"""tunelab/integrity.py: a failed write leaves the old file and no temp file; a checkpoint passes for whole
only with its completion marker and every file at its saved size; run_status.json."""

import errno
import json

import pytest

from tunelab import integrity


def _disk_full():
    return OSError(errno.ENOSPC, "No space left on device")


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "results.json"
    integrity.write_json(path, {"a": 1})
    integrity.write_json(path, {"a": 2, "b": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "b": "ü"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "likelihood.jsonl"
    path.write_text('{"old": true}\n')
    with pytest.raises(OSError, match="No space"):
        with integrity.atomic_open(path) as f:
            f.write('{"new": 1}\n{"ne')  # half a file written, then the disk is full
            raise _disk_full()
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["likelihood.jsonl"]


def test_a_new_file_that_fails_is_not_there_at_all(tmp_path):
    with pytest.raises(OSError):
        with integrity.atomic_open(tmp_path / "x.json") as f:
            f.write("{")
            raise _disk_full()
    assert list(tmp_path.iterdir()) == []


def _checkpoint(run_dir, step, marked=True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if marked:
        integrity.mark_complete(folder, step)
    return folder


def test_a_marked_checkpoint_is_whole_and_lists_its_files(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    assert integrity.checkpoint_problem(folder) is None
    marker = json.loads((folder / integrity.MARKER).read_text())
    assert marker["step"] == 4 and marker["files"] == {"adapter_model.safetensors": 100, "trainer_state.json": 2}


def test_a_checkpoint_without_its_marker_is_not_whole(tmp_path):
    """kill -9 between checkpoint files: the marker, written last, is missing."""
    folder = _checkpoint(tmp_path, 8, marked=False)
    assert "not saved to the end" in integrity.checkpoint_problem(folder)


def test_a_truncated_file_is_found(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 40)
    assert integrity.checkpoint_problem(folder) == (
        "adapter_model.safetensors is 40 bytes, 100 when saved (truncated or changed)")
    (folder / "adapter_model.safetensors").unlink()
    assert integrity.checkpoint_problem(folder) == "adapter_model.safetensors is missing"


def test_method_file_sizes_cover_a_run_dir(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 10)
    integrity.write_json(tmp_path / integrity.METHOD_FILE, {"files": {"adapter_model.safetensors": 10}})
    assert integrity.checkpoint_problem(tmp_path) is None
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 3)
    assert "3 bytes, 10 when saved" in integrity.checkpoint_problem(tmp_path)


def test_a_run_dir_is_whole_only_when_its_run_is_done(tmp_path):
    assert integrity.checkpoint_problem(tmp_path) is None  # written before run_status.json existed
    integrity.set_status(tmp_path, "running")
    assert "did not finish (run_status.json: running)" in integrity.checkpoint_problem(tmp_path)
    integrity.set_status(tmp_path, "failed", "OSError: no space")
    status = integrity.read_status(tmp_path)
    assert status["status"] == "failed" and status["error"] == "OSError: no space" and status["started"]
    integrity.set_status(tmp_path, "done")
    assert integrity.checkpoint_problem(tmp_path) is None


def test_complete_checkpoints_by_step(tmp_path):
    for step, marked in ((12, True), (4, True), (16, False), (8, True)):
        _checkpoint(tmp_path, step, marked)
    (tmp_path / "checkpoint-x").mkdir()
    assert [s for s, _ in integrity.checkpoint_folders(tmp_path)] == [4, 8, 12, 16]
    assert [s for s, _ in integrity.complete_checkpoints(tmp_path)] == [4, 8, 12]
    assert integrity.checkpoint_step(tmp_path / "checkpoint-12") == 12 and integrity.checkpoint_step(tmp_path) is None
