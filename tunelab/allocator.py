"""Which malloc tunelab's hot commands run under, decided once at process start (the `tunelab` entry re-executes
itself with the environment `allocator_env` returns; bench workers do the same).

Why: a training step allocates and frees the same few hundred MB of activations, logits and gradients every
step. glibc malloc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap() and unmaps
it on free, so each step pays the page faults and zeroing again — 100k-300k minor faults per LoRA step on
SmolLM2 here, against ~2.5k once the heap has grown under tcmalloc, which keeps freed memory for reuse.
Measured (bench/README.md, LoRA q,v all layers, one run): tcmalloc 789 tokens/s, glibc told to keep freed
memory too (MALLOC_MMAP_MAX_=0: no mmap'd blocks; MALLOC_TRIM_THRESHOLD_: never trim the heap) 702 (+600 MB
peak RSS), plain glibc 548.
Both settings only work from process start (LD_PRELOAD, glibc reads MALLOC_* at start-up), hence the re-exec.
The price of both: the process keeps its peak heap instead of returning memory to the system.

TUNELAB_ALLOCATOR picks: `auto` (default: tcmalloc when installed — `apt-get install libtcmalloc-minimal4`,
scripts/install.sh — else tuned glibc), `tcmalloc`, `glibc` (tuned glibc), `system` (leave malloc alone).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from tunelab.errors import TunelabError, closest

CHOICES = ("auto", "tcmalloc", "glibc", "system")
ACTIVE = "TUNELAB_ALLOCATOR_ACTIVE"  # set for the re-executed process: what it runs under, and the loop guard
GLIBC_TUNING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
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


def allocator_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute under, or None to run as is: not Linux, TUNELAB_ALLOCATOR=system,
    already re-executed, or the user set LD_PRELOAD=...tcmalloc / MALLOC_* themselves."""
    choice = environ.get("TUNELAB_ALLOCATOR", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise TunelabError(f"TUNELAB_ALLOCATOR={choice!r}: {closest(choice, list(CHOICES))}")
    if choice == "system" or environ.get(ACTIVE) or not sys.platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return None
    lib = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
    if lib:
        # tcmalloc prints a line for every allocation above 1 GiB by default; big logits tensors are routine
        return {**environ, "LD_PRELOAD": f"{lib} {preload}".strip(), ACTIVE: "tcmalloc",
                "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                     str(1 << 40))}
    if platform.libc_ver()[0] != "glibc" or any(k in environ for k in GLIBC_TUNING):
        return None
    return {**environ, **GLIBC_TUNING, ACTIVE: "glibc"}


def reexec(args: list[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process by `python *args` under `env` (what allocator_env returned), output flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


def active_allocator() -> str:
    """"tcmalloc" when tcmalloc is mapped into this process, "glibc" for tuned glibc, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    if "libtcmalloc" in maps:
        return "tcmalloc"
    return "glibc" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "system"
