"""Run the current command under tcmalloc: re-exec the process once with LD_PRELOAD set.

Why: a training step allocates and frees the same few hundred MB of activations, logits and gradients
every step. glibc malloc serves blocks above its mmap threshold with fresh mmap()s, so each step pays
page faults and zeroing again; tcmalloc keeps the freed memory and hands it back. bench.train measures
the difference (the `allocator` rows). LD_PRELOAD only works at process start, hence the re-exec.

The `tunelab` console entry does the same (tunelab/cli.py: `entry`); this copy re-executes bench
workers (`python -m bench.train --worker ...`), so the tunelab rows run as `tunelab train` would.
`TUNELAB_ALLOCATOR=system` turns it off (the orchestrator's glibc rows); nothing happens where
libtcmalloc_minimal.so.4 is absent (`apt-get install libtcmalloc-minimal4`, scripts/install.sh).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/lib/x86_64-linux-gnu")


def find_tcmalloc() -> str | None:
    """Full path of an installed tcmalloc, or None."""
    for folder in _LIB_DIRS:
        for name in TCMALLOC_NAMES:
            if Path(folder, name).is_file():
                return str(Path(folder, name))
    found = ctypes.util.find_library("tcmalloc_minimal")  # ldconfig's view, e.g. on other distributions
    return found if found and os.path.isabs(found) else None


def active_allocator() -> str:
    """"tcmalloc" when tcmalloc is mapped into this process, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "tcmalloc" if "libtcmalloc" in maps else "system"


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded; returns only when it does nothing:
    TUNELAB_ALLOCATOR=system, not Linux, tcmalloc already loaded or preloaded, or tcmalloc not installed."""
    if os.environ.get("TUNELAB_ALLOCATOR", "").lower() == "system" or not sys.platform.startswith("linux"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or active_allocator() == "tcmalloc":
        return  # also the loop guard: the re-executed process sees its own LD_PRELOAD
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib} {preload}".strip(),
               # tcmalloc prints a line for every allocation above 1 GiB by default; big logits are routine
               TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                     str(1 << 40)))
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the command line as typed (keeps `-m pkg`), so `python -m tunelab` and the
    # `tunelab` console script both come back as themselves
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
