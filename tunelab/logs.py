"""Quiet, clean command output: the known upstream warnings filtered in one place, and progress that suits
where stderr goes — bars on a terminal, a plain line now and then in a log file (no `\\r`-joined floods).

    from tunelab.logs import progress
    bar = progress(total=48, desc="generate", unit="sample")   # tqdm on a terminal, LineProgress otherwise
    bar.update(8); bar.close()

`setup_command_logs()` runs once per command (tunelab/cli.py): it installs the warning filters and, when
stderr is not a terminal, turns off the progress bars of huggingface_hub / transformers (weight loading) and
datasets (map, save) through their documented environment variables, unless the user set them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any, MutableMapping

logger = logging.getLogger(__name__)

# Upstream warnings every tunelab command would print and the user can do nothing about: (category, start of
# the message, why it is harmless and when to drop the entry). Filtered by message, so any other warning of
# the same category still shows.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft's get_peft_model reads transformers 5's deprecated property (peft/peft_model.py); drop when peft "
     "reads is_activation_checkpointing"),
)

PROGRESS_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
LINE_EVERY_S = 30.0  # a non-terminal progress line at most this often


def quiet_known_warnings() -> None:
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def setup_command_logs(environ: MutableMapping[str, str] = os.environ, stream: Any = None) -> None:
    """Warning filters, and no library progress bars when stderr is a file or a pipe (the user's setting of
    the variables wins)."""
    quiet_known_warnings()
    if not is_terminal(stream):
        for name in PROGRESS_ENV:
            environ.setdefault(name, "1")


def trainer_progress(training, explicit: frozenset[str], stream: Any = None):
    """The training options with HF's progress bar off when stderr is not a terminal (its PrinterCallback then
    prints one line per logging step instead); as given when --disable_tqdm was set."""
    import dataclasses

    if is_terminal(stream) or "disable_tqdm" in explicit or training.disable_tqdm:
        return training
    return dataclasses.replace(training, disable_tqdm=True)


class LineProgress:
    """A progress bar's news as a log line at most every `every` seconds, and one at the end: for stderr that
    is a file. The subset of tqdm's interface tunelab uses (update, close)."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = LINE_EVERY_S,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.n, self.start = 0, clock()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s, {elapsed:.0f} s, {self.n / elapsed:.2f} {self.unit}/s"

    def close(self) -> None:
        logger.info("%s", self.line(self.clock()))


def progress(total: int, desc: str, unit: str = "it", disable: bool = False, stream: Any = None):
    """tqdm on a terminal; LineProgress when stderr is a file or a pipe; a silent one when `disable`."""
    from tqdm.auto import tqdm

    if disable or is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable)
    return LineProgress(total, desc, unit)
