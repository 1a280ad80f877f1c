"""The allocator choice made at process start: tcmalloc when installed, else glibc told to keep freed memory;
TUNELAB_ALLOCATOR overrides; never a second re-exec."""

import platform

import pytest

from tunelab import allocator
from tunelab.allocator import ACTIVE, GLIBC_TUNING, allocator_env
from tunelab.errors import TunelabError

TCMALLOC = "/usr/lib/libtcmalloc_minimal.so.4"


@pytest.fixture
def tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: TCMALLOC)


@pytest.fixture
def no_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)


def test_auto_prefers_tcmalloc_and_keeps_other_preloads(tcmalloc):
    env = allocator_env({"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{TCMALLOC} libother.so" and env[ACTIVE] == "tcmalloc" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no report line per big logits tensor
    assert allocator_env(env) is None  # the re-executed process: no second exec


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tuning applies to glibc only")
def test_without_tcmalloc_glibc_keeps_freed_memory(no_tcmalloc):
    env = allocator_env({})
    assert {k: env[k] for k in GLIBC_TUNING} == GLIBC_TUNING and env[ACTIVE] == "glibc"
    assert allocator_env(env) is None
    assert allocator_env({"MALLOC_MMAP_MAX_": "65536"}) is None  # the user tuned glibc: leave it


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tuning applies to glibc only")
def test_choices(tcmalloc):
    assert allocator_env({"TUNELAB_ALLOCATOR": "system"}) is None
    assert allocator_env({"TUNELAB_ALLOCATOR": "glibc"})[ACTIVE] == "glibc"  # chosen over an installed tcmalloc
    assert allocator_env({"TUNELAB_ALLOCATOR": "TCMalloc"})[ACTIVE] == "tcmalloc"
    assert allocator_env({"LD_PRELOAD": "libtcmalloc.so.4"}) is None  # preloaded by the user already
    with pytest.raises(TunelabError, match="did you mean glibc"):
        allocator_env({"TUNELAB_ALLOCATOR": "glib"})


def test_bench_workers_reexec_their_own_command_line_once(monkeypatch):
    """bench workers come back as the command typed (`python -m bench.train --worker ...`), under the env
    allocator_env returns; with nothing to change they carry on in the same process."""
    import os
    import sys

    from bench.allocator import reexec_under_allocator

    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "bench.train", "--worker", "{}"])
    monkeypatch.setattr("bench.allocator.allocator_env", lambda environ: None)
    reexec_under_allocator()
    assert calls == []
    monkeypatch.setattr("bench.allocator.allocator_env", lambda environ: {ACTIVE: "tcmalloc"})
    reexec_under_allocator()
    assert calls == [(sys.executable, [sys.executable, "-m", "bench.train", "--worker", "{}"], {ACTIVE: "tcmalloc"})]
