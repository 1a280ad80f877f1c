"""tunelab/signals.py: the first SIGINT/SIGTERM asks for a clean stop, a second stops at once; a study sent
SIGTERM during a row marks that row interrupted, exits 143, and a rerun resumes it; a second SIGTERM stops the
study at once, still marking the row. (A signal mid-training: tests/test_resume.py; mid-eval:
tests/test_faults.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study_efficiency import fake_calibrate
from test_study_fakes import fake_run, read_calls

from tunelab import signals
from tunelab.study import runner

REPO = Path(__file__).resolve().parents[1]


def test_first_signal_asks_second_stops_at_once(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with signals.graceful():
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested() == signal.SIGTERM  # asked, not stopped
        assert "send it again to stop now" in capsys.readouterr().err
        os.kill(os.getpid(), signal.SIGTERM)  # the same request arriving twice (process group + forwarded)
        with pytest.raises(signals.Interrupted) as caught:
            signals.check()
        assert caught.value.exit_code == 143 and isinstance(caught.value, KeyboardInterrupt)
        monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(signals.Interrupted, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: raised from the handler, at once
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before and signals.requested() is None


def test_nested_blocks_share_one_request():
    with signals.graceful():
        with signals.graceful():
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested() == signal.SIGINT  # the inner block does not forget it
        with pytest.raises(signals.Interrupted) as caught:
            signals.check()
        assert caught.value.exit_code == 130
    signals.check()  # outside every block: nothing pending


_STUDY = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from test_study_efficiency import fake_calibrate
from test_study_fakes import fake_run
from tunelab.study import runner
from tunelab.study.cli import main

def slow_run(args):  # row 1's training takes a while: the test sends SIGTERM during it
    if "r01" in str(args.training.output_dir) and args.training.do_train:
        Path(sys.argv[2], "started").write_text("x")
        time.sleep(float(sys.argv[4]))
    return fake_run(args)

runner.default_run_fn, runner.default_calibrate = slow_run, fake_calibrate
sys.exit(main(["examples/study_tiny.yaml", "--output_dir", sys.argv[1], "--set", "model_name_or_path=" + sys.argv[3]]))
"""


def _study_in_row_1(tmp_path, tiny_llama_dir, train_seconds: float):
    """A study process (fake runs) whose row 1 is training (for `train_seconds`), once it has started it."""
    proc = subprocess.Popen([sys.executable, "-c", _STUDY, str(tmp_path / "study"), str(tmp_path), str(tiny_llama_dir),
                             str(train_seconds)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def test_sigterm_during_a_study_row_marks_it_interrupted_and_a_rerun_resumes(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "study"
    proc = _study_in_row_1(tmp_path, tiny_llama_dir, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in err and "continues where it stopped" in err and "Traceback" not in err
    row = json.loads((out / "rows/r01_lora_qkv_last1_s42/row.json").read_text())
    assert row["status"] == "interrupted" and "SIGTERM" in row["error"]
    assert row["stages"]["train"]["status"] == "done"  # the stage under way finished; the next did not start
    assert not (out / "rows/r02_freeze_mlp_last1_aux_s42").exists()

    from tunelab.study.cli import main

    monkeypatch.setattr(runner, "default_run_fn", fake_run)
    monkeypatch.setattr(runner, "default_calibrate", fake_calibrate)
    n = len(read_calls(out))
    assert main([str(out)]) == 0
    redone = [c["stage"] for c in read_calls(out)[n:]]
    assert "rows/r01_lora_qkv_last1_s42/train" not in redone and "rows/r01_lora_qkv_last1_s42/persona" in redone
    row = json.loads((out / "rows/r01_lora_qkv_last1_s42/row.json").read_text())
    assert row["status"] == "done" and row["attempts"] == 2


def test_a_second_sigterm_stops_the_study_at_once(tmp_path, tiny_llama_dir):
    """Row 1's training would take 10 minutes: the first SIGTERM waits for it, the second (after the repeat
    window) abandons it; the row is still marked interrupted and the exit code is 143."""
    out = tmp_path / "study"
    proc = _study_in_row_1(tmp_path, tiny_llama_dir, 600)
    proc.send_signal(signal.SIGTERM)
    time.sleep(signals.REPEAT_WINDOW_S + 0.5)
    assert proc.poll() is None  # the first signal waits for the stage under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # far less than the 600 s the stage would take
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    row = json.loads((out / "rows/r01_lora_qkv_last1_s42/row.json").read_text())
    assert row["status"] == "interrupted" and "SIGTERM" in row["error"]
    assert row["stages"]["train"]["status"] != "done"  # abandoned, not finished
