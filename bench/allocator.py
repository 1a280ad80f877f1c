"""Re-execute a bench worker under the allocator `tunelab` itself would pick (tunelab/allocator.py).

The `tunelab` console entry re-executes itself the same way (tunelab/cli.py: `entry`); this re-executes
bench workers (`python -m bench.train --worker ...`), so the tunelab rows run as `tunelab train` would.
The orchestrator picks per row through TUNELAB_ALLOCATOR: `system` (the plain-script baseline and the
`*_system` rows), `tcmalloc`, or `glibc` (glibc told to keep freed memory, the fallback without tcmalloc).
"""

from __future__ import annotations

import os
import sys

from tunelab.allocator import active_allocator, allocator_env, find_tcmalloc, reexec

__all__ = ["active_allocator", "find_tcmalloc", "reexec_under_allocator"]


def reexec_under_allocator() -> None:
    """Replace this process by the same command under the chosen allocator; returns only when there is
    nothing to change (see tunelab.allocator.allocator_env)."""
    env = allocator_env(os.environ)
    if env is not None:
        # sys.orig_argv is the command line as typed (keeps `-m pkg`), so a `python -m bench.train --worker`
        # process comes back as itself
        reexec(sys.orig_argv[1:], env)
