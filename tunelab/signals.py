"""SIGINT / SIGTERM: stop at a clean point, record it, exit non-zero; a second signal stops at once.

    with signals.graceful():      # tunelab train and the study runner; nested uses share one state
        ...
        signals.check()           # at a clean point: raises Interrupted when a signal has arrived

The first signal sets a flag and prints one line. Training sees the flag at the end of the optimizer step
(tunelab/resume.py's callback), saves a checkpoint and stops; `train` then raises Interrupted, marks the run
"interrupted" in run_status.json and exits 128 + the signal (130 for Ctrl-C, 143 for the SIGTERM that `kill`
and a Slurm preemption send); `--resume_from_checkpoint true` continues it. The study runner checks between
stages and rows and marks its row "interrupted"; rerunning the study resumes it. A second signal raises
Interrupted at once, wherever the program is (the completion markers of tunelab/integrity.py keep anything
it leaves half-written from passing for whole). A repeat within a second counts as the same request: a
terminal's Ctrl-C reaches every process of the group, and the study also forwards a SIGTERM to its workers.

Eval and predict (`graceful(at_once=True)`) have no step to finish and nothing to resume: the first signal
stops them at once, their run_status.json says "interrupted", and the command is simply run again.

Interrupted is a KeyboardInterrupt, so `except Exception` (a failing row, a failing stage) never swallows it.
Handlers can only be installed in the main thread; elsewhere `graceful()` changes nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0


class Interrupted(KeyboardInterrupt):
    """A run or study stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT,
                 next_step: str = "--resume_from_checkpoint true continues the run"):
        self.signum = signum
        self.next_step = next_step  # what the CLI tells the user to do next
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


_received: int | None = None
_received_at = 0.0
_depth = 0


def requested() -> int | None:
    """The signal that asked this process to stop, None when none has."""
    return _received


def check() -> None:
    """Raise Interrupted when a signal has asked this process to stop (call it at a clean point)."""
    if _received is not None:
        raise Interrupted(_received)


def _handle(signum: int, _frame) -> None:
    global _received, _received_at
    now = time.monotonic()
    if _received is not None:
        if now - _received_at < REPEAT_WINDOW_S:
            return  # the same request reaching us twice (process group + forwarded)
        raise Interrupted(signum)
    _received, _received_at = signum, now
    print(f"\ntunelab: {signal.Signals(signum).name} received: stopping at the next clean point (after this "
          "step, with a checkpoint); send it again to stop now", file=sys.stderr, flush=True)


def _stop_now(signum: int, _frame) -> None:
    raise Interrupted(signum, next_step="run the same command again")


@contextmanager
def graceful(at_once: bool = False) -> Iterator[None]:
    """Handle SIGINT and SIGTERM as described above while the block runs; restores the old handlers after
    the outermost block and forgets a signal nobody acted on. `at_once`: work with no clean point to wait for
    (eval, predict: nothing to resume) stops at the first signal; inside an outer block (a study's row) the
    outer block's handling stays."""
    global _depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop_now if at_once else _handle) for s in SIGNALS} if _depth == 0 else {}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _received = None
