"""The dispatch table and the console entry's allocator choice."""

import os
import sys

import pytest

from tunelab import cli


def test_every_command_resolves():
    for name, (target, _help) in cli.COMMANDS.items():
        assert callable(cli._resolve(target)), name


def test_unknown_command_suggests(capsys):
    assert cli.main(["trian"]) == 2
    assert "did you mean train" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize("argv, reexec", [(["train", "--help"], True), (["score", "x.jsonl"], False), ([], False)])
def test_entry_reexecs_only_commands_with_hot_loops(monkeypatch, argv, reexec):
    """`tunelab train/eval/predict/study/...` re-execute under the allocator tunelab.allocator picks; `score`
    (no hot loop) and the bare command do not."""
    calls = []

    def execve(path, args, env):
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr("tunelab.allocator.allocator_env", lambda environ: {"X": "1"})
    monkeypatch.setattr(cli, "main", lambda argv: 0)
    monkeypatch.setattr(sys, "argv", ["tunelab", *argv])
    if reexec:
        with pytest.raises(SystemExit):
            cli.entry()
        assert calls == [[sys.executable, "-m", "tunelab", *argv]]
    else:
        assert cli.entry() == 0 and calls == []


def test_entry_names_the_valid_allocators(monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_ALLOCATOR", "tcmaloc")
    monkeypatch.setattr(sys, "argv", ["tunelab", "train"])
    assert cli.entry() == 2
    assert "did you mean tcmalloc" in capsys.readouterr().err
