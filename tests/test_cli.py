"""The dispatch table and the console entry's allocator choice."""

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


@pytest.mark.parametrize("argv, env, wanted", [
    (["train"], {}, True),
    (["score"], {}, False),                                     # no hot loop: not worth a re-exec
    (["train"], {"TUNELAB_ALLOCATOR": "system"}, False),        # opt-out
    (["train"], {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, False),  # already loaded: never loops
])
def test_tcmalloc_reexec_decision(monkeypatch, argv, env, wanted):
    import ctypes.util

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("TUNELAB_ALLOCATOR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = cli._tcmalloc_env(argv)
    assert (got is not None) == wanted
    if wanted:
        assert "tcmalloc" in got["LD_PRELOAD"]
