"""tunelab/resume.py and the faults a run must survive: disk full while saving a checkpoint, kill -9 between
checkpoint files, a signal mid-training. Each time the half-saved checkpoint is refused, resume picks the
last complete one, and the resumed run ends with the uninterrupted run's loss curve and train_loss."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_dataset
from test_train import losses, train_argv

from tunelab import integrity
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.hparams import parse_args
from tunelab.methods import split_checkpoints
from tunelab.resume import RUNTIME_FILE, clear_old_checkpoints, resolve_resume, whole_run_loss, whole_run_metrics
from tunelab.train import run

REPO = Path(__file__).resolve().parents[1]
EIGHT_STEPS = ["--max_steps", "8", "--save_steps", "4"]


def test_whole_run_loss_weights_each_logged_mean_by_its_steps():
    history = [{"loss": 2.0, "step": 2}, {"loss": 0.5, "step": 5}, {"loss": 1.0, "step": 4},
               {"train_loss": 9.0, "step": 5}, {"eval_loss": 3.0, "step": 4}]
    assert whole_run_loss(history) == pytest.approx((2 * 2.0 + 2 * 1.0 + 1 * 0.5) / 5)
    assert whole_run_loss([]) is None


def test_whole_run_metrics_add_the_earlier_sessions_time(tmp_path):
    """Resumed at step 3 of 8 after 14 s of training: this session ran 5 steps (8 samples each) in 10 s."""
    from types import SimpleNamespace

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / RUNTIME_FILE).write_text('{"train_runtime": 14.0}')
    session = {"train_runtime": 10.0, "train_samples_per_second": 4.0, "train_steps_per_second": 0.5,
               "train_loss": 0.8, "total_flos": 7.0}
    state = SimpleNamespace(global_step=8, log_history=[{"loss": 2.0, "step": 3}, {"loss": 0.8, "step": 8}])
    whole = whole_run_metrics(session, state, str(ckpt))
    assert whole == {"train_runtime": 24.0, "train_samples_per_second": round(64 / 24, 3),
                     "train_steps_per_second": round(8 / 24, 3), "train_loss": (3 * 2.0 + 5 * 0.8) / 8,
                     "total_flos": 7.0}
    assert whole_run_metrics(session, state, None) == {**session, "train_loss": whole["train_loss"]}  # never stopped


def _checkpoint(run_dir, step, whole=True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if whole:
        integrity.mark_complete(folder, step)
    return folder


def test_resume_true_picks_the_last_complete_checkpoint_and_removes_half_saved_ones(tmp_path):
    for step, whole in ((4, True), (8, True), (12, False)):
        _checkpoint(tmp_path, step, whole)
    assert resolve_resume("true", tmp_path) == str(tmp_path / "checkpoint-8")
    assert not (tmp_path / "checkpoint-12").exists()
    assert resolve_resume(None, tmp_path) is None


def test_resume_refuses_an_incomplete_checkpoint_naming_the_last_complete_one(tmp_path):
    _checkpoint(tmp_path, 4)
    half = _checkpoint(tmp_path, 8, whole=False)
    with pytest.raises(TunelabError, match=r"checkpoint-8 is incomplete: it was not saved to the end.*checkpoint-4"):
        resolve_resume(str(half), tmp_path)
    only_half = tmp_path / "other"
    _checkpoint(only_half, 8, whole=False)
    with pytest.raises(TunelabError, match=r"no complete checkpoint-\* folder .*\(1 not saved to the end\)"):
        resolve_resume("last", only_half)


def test_overwrite_clears_older_checkpoints_unless_one_is_loaded(tmp_path):
    old = _checkpoint(tmp_path, 4)
    with pytest.raises(TunelabError, match="--overwrite_output_dir replaces"):
        clear_old_checkpoints(tmp_path, [str(old)])
    integrity.set_status(tmp_path, "failed")
    clear_old_checkpoints(tmp_path, [])
    assert not old.exists() and not (tmp_path / integrity.STATUS_FILE).exists()


# ---- on a tiny model ----

@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """An 8-step LoRA run never stopped (checkpoints at 4 and 8): (data dir, its losses, its train_loss)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_tiny_dataset(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(root / "cache"))
        out = root / "run"
        run(parse_args(train_argv(tiny_llama_dir, data, out, "lora", *EIGHT_STEPS)))
    results = json.loads((out / "train_results.json").read_text())
    return data, losses(out), results["train_loss"]


def _resume_and_compare(tiny_llama_dir, reference, out, exact=True):
    data, curve, train_loss = reference
    run(parse_args(train_argv(tiny_llama_dir, data, out, "lora", *EIGHT_STEPS, "--resume_from_checkpoint", "true")))
    results = json.loads((out / "train_results.json").read_text())
    assert integrity.read_status(out)["status"] == "done"
    if exact:
        assert losses(out) == curve and results["train_loss"] == train_loss
    else:  # the stop logged once more (at its step); the same steps' losses, grouped otherwise
        assert losses(out)[-2:] == curve[-2:] and results["train_loss"] == pytest.approx(train_loss, rel=1e-6)
    return results


def test_the_uninterrupted_train_loss_is_the_mean_over_its_steps(reference):
    _, curve, train_loss = reference
    assert len(curve) == 4 and train_loss == pytest.approx(sum(curve) / 4)


def test_disk_full_while_saving_leaves_no_checkpoint_that_passes_for_whole(tiny_llama_dir, reference, tmp_path,
                                                                           monkeypatch, capsys):
    import safetensors.torch

    data = reference[0]
    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-8" in str(filename) and str(filename).endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"\0" * 16)  # what got written before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space"):
        run(parse_args(train_argv(tiny_llama_dir, data, out, "lora", *EIGHT_STEPS)))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    status = integrity.read_status(out)
    assert status["status"] == "failed" and "No space left" in status["error"]
    assert "not saved to the end" in integrity.checkpoint_problem(out / "checkpoint-8")
    with pytest.raises(TunelabError, match="checkpoint-8 is incomplete.*last complete checkpoint is .*checkpoint-4"):
        split_checkpoints(str(out / "checkpoint-8"))
    argv = ["predict", "--checkpoint_dir", str(out / "checkpoint-8"), "--dataset", "tiny", "--dataset_dir", str(data),
            "--output_dir", str(tmp_path / "eval")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "incomplete" in err and not (tmp_path / "eval").exists()
    _resume_and_compare(tiny_llama_dir, reference, out)


_KILL = """
import os, signal, sys
from tunelab.trainer import TunelabTrainer
from tunelab.train import main

save_rng = TunelabTrainer._save_rng_state

def killed(self, output_dir):  # kill -9 between the files of checkpoint-8: weights and optimizer written, no more
    if output_dir.endswith("checkpoint-8"):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)

TunelabTrainer._save_rng_state = killed
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_between_checkpoint_files_then_resume_reproduces_the_run(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny_llama_dir, reference[0], out, "lora", *EIGHT_STEPS)
    env = {**os.environ, "TUNELAB_ALLOCATOR": "system"}
    proc = subprocess.run([sys.executable, "-c", _KILL, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-8" / "optimizer.safetensors").is_file()
    assert integrity.checkpoint_problem(out / "checkpoint-8") and integrity.read_status(out)["status"] == "running"
    earlier = json.loads((out / "checkpoint-4" / RUNTIME_FILE).read_text())["train_runtime"]
    results = _resume_and_compare(tiny_llama_dir, reference, out)
    assert results["train_resumed_from_step"] == 4
    # the run's metrics cover all 8 steps: the first session's time up to checkpoint-4 is counted in
    assert earlier > 0 and results["train_runtime"] > earlier
    assert results["train_steps_per_second"] == pytest.approx(8 / results["train_runtime"], abs=1e-3)
    assert json.loads((out / "all_results.json").read_text())["train_runtime"] == results["train_runtime"]


def test_a_signal_mid_training_saves_the_step_marks_the_run_and_resume_continues(tiny_llama_dir, reference,
                                                                                 tmp_path, monkeypatch, capsys):
    from tunelab.trainer import TunelabTrainer

    real_step = TunelabTrainer.training_step

    def step(self, *args, **kwargs):
        if self.state.global_step == 2:  # during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(TunelabTrainer, "training_step", step)
    out = tmp_path / "run"
    assert main(["train", *train_argv(tiny_llama_dir, reference[0], out, "lora", *EIGHT_STEPS)]) == 143
    assert "SIGTERM" in capsys.readouterr().err
    assert integrity.read_status(out)["status"] == "interrupted"
    assert [s for s, _ in integrity.complete_checkpoints(out)] == [3]  # saved at the step it stopped on
    assert not (out / "train_results.json").exists()
    monkeypatch.setattr(TunelabTrainer, "training_step", real_step)
    _resume_and_compare(tiny_llama_dir, reference, out, exact=False)


def test_overwrite_output_dir_starts_clean(tiny_llama_dir, reference, tmp_path):
    out = tmp_path / "run"
    _checkpoint(out, 4)  # an older run's checkpoint
    argv = train_argv(tiny_llama_dir, reference[0], out, "lora", "--max_steps", "2", "--overwrite_output_dir")
    run(parse_args(argv))
    # only this run's own checkpoint (HF saves the last step) is left to resume from
    assert [s for s, _ in integrity.checkpoint_folders(out)] == [2] and integrity.read_status(out)["status"] == "done"
    assert resolve_resume("true", out) == str(out / "checkpoint-2")
