"""The dispatch table, the console entry's allocator choice, and the parser every command shares (dashed
aliases, one-line errors, a complete --help)."""

import os
import sys

import pytest

from tunelab import cli
from tunelab.errors import TunelabError


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


@pytest.mark.parametrize("argv, reexec", [(["train", "--do_train"], True), (["score", "x.jsonl"], False), ([], False),
                                          (["train", "--help"], False)])
def test_entry_reexecs_only_commands_with_hot_loops(monkeypatch, argv, reexec):
    """`tunelab train/eval/predict/study/...` re-execute under the allocator tunelab.allocator picks; `score`
    (no hot loop), the bare command and --help do not."""
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


# ---- the shared parser: one-line errors, dashed aliases; every command's --help complete ----

@pytest.mark.parametrize("argv, known, expected", [
    (["--dry-run"], {"--dry_run"}, ["--dry_run"]),
    (["--output-dir=runs/x", "a-b"], {"--output_dir"}, ["--output_dir=runs/x", "a-b"]),  # values untouched
    (["--no-such-flag"], {"--dry_run"}, ["--no-such-flag"]),  # unknown: left for the parser to refuse
    (["--source_prefix", "--x-y"], {"--source_prefix", "--x_y"}, ["--source_prefix", "--x_y"]),
    (["--", "--dry-run"], {"--dry_run"}, ["--", "--dry-run"]),  # nothing after a bare --
    (["-h", "--learning-rate", "1e-4"], {"--learning_rate"}, ["-h", "--learning_rate", "1e-4"]),
])
def test_underscored(argv, known, expected):
    assert cli.underscored(argv, known) == expected


def test_parser_takes_the_dashed_form_of_any_flag_and_raises_tunelab_errors():
    parser = cli.Parser(prog="tunelab x")
    parser.add_argument("--max_items", type=int)
    parser.add_argument("--dry_run", action="store_true")
    assert vars(parser.parse_args(["--max-items", "3", "--dry-run"])) == {"max_items": 3, "dry_run": True}
    assert vars(parser.parse_args(["--max_items=4"])) == {"max_items": 4, "dry_run": False}
    with pytest.raises(TunelabError, match="unrecognized arguments: --nope"):
        parser.parse_args(["--nope"])
    with pytest.raises(TunelabError, match="invalid int value"):
        parser.parse_args(["--max-items", "x"])


def test_study_flags_are_underscored_with_dashed_aliases():
    from tunelab.study.cli import build_parser

    for argv in (["s.yaml", "--dry_run", "--report_only", "--rows_per_gpu", "2"],
                 ["s.yaml", "--dry-run", "--report-only", "--rows-per-gpu", "2"]):
        ns = build_parser().parse_args(argv)
        assert (ns.dry_run, ns.report_only, ns.rows_per_gpu) == (True, True, 2)


def _parsers(command: str) -> list:
    """The parsers whose options `tunelab <command>` accepts."""
    from tunelab import hparams

    if command == "score":
        from tunelab.metrics import build_parser
        return [build_parser()]
    if command == "study":
        from tunelab.study.cli import build_parser
        return [build_parser()]
    extra = {"serve": "tunelab.serve:ServeArguments", "webui": "tunelab.webui:WebUIArguments",
             "export": "tunelab.export:ExportArguments"}.get(command)
    own = [hparams._Parser([cli._resolve(extra)])] if extra else []
    return own + [hparams.build_parser()]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "chat", "serve", "webui", "export", "score",
                                     "study"])
def test_every_commands_help_all_lists_every_option_it_accepts(command, capsys):
    flag = "--help" if command in ("score", "study") else "--help-all"
    with pytest.raises(SystemExit) as done:
        cli.main([command, flag])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tunelab {command}")  # the command's own name, never __main__.py
    accepted = [action.option_strings[0] if action.option_strings else action.dest
                for parser in _parsers(command) for action in parser._actions if action.dest != "help"]
    assert len(accepted) > (1 if command == "score" else 5)
    missing = [name for name in accepted if name not in out]
    assert not missing, f"tunelab {command} {flag} omits {missing}"
    assert cli.ALIAS_NOTE in out


def _headings(out: str) -> list[str]:
    return [line[:-1] for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]


@pytest.mark.parametrize("command", ["train", "eval", "predict", "chat"])
def test_help_groups_tunelab_options_by_topic_and_names_the_usual_training_flags(command, capsys):
    """Plain --help: tunelab's options under topic headings (model, data, method, generation, run), then one
    training heading naming the usual HF flags (each a real Seq2SeqTrainingArguments field) and --help-all."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    from tunelab import hparams, helptext

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    headings = _headings(out)
    assert headings[:2] == ["help", "model"] and headings[-1].startswith("training (")
    assert {"data", "run"} <= set(headings) and any(h.startswith("method") for h in headings)
    tunelab_flags = [f"--{f.name}" for g in hparams._GROUPS if not isinstance(g, str) for f in dataclasses.fields(g)]
    assert all(flag in out for flag in tunelab_flags)
    assert "--adam_beta1" not in out and "--help-all" in out  # HF's rarer fields only behind --help-all
    hf_fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    assert set(helptext.COMMON_TRAINING) <= hf_fields
    assert all(f"--{name}" in out for name in helptext.COMMON_TRAINING)


# what printing help must never load: each takes seconds to import (FastAPI and gradio pull in torch)
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "accelerate", "fastapi", "starlette", "gradio",
                 "uvicorn", "matplotlib", "numpy", "nltk", "jieba")


def test_no_commands_help_imports_a_heavy_module():
    """`tunelab <command> --help` renders from the option dataclasses and parsers: a fresh interpreter prints
    every command's help without loading torch, transformers, FastAPI, gradio, ... (what keeps each under a
    second; the figure is in bench/README.md). One interpreter for all: a module, once loaded, stays loaded,
    so the list after each command names the first command that loaded it."""
    import json
    import subprocess

    code = ("import contextlib, io, json, sys; from tunelab import cli\n"
            f"heavy, seen = {HEAVY_MODULES!r}, {{}}\n"
            "for command in cli.COMMANDS:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n            cli.main([command, '--help'])\n        except SystemExit:\n            pass\n"
            "    seen[command] = [out.getvalue().split('\\n')[0], sorted(m for m in heavy if m in sys.modules)]\n"
            "print(json.dumps(seen))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert list(seen) == list(cli.COMMANDS)
    for command, (usage, loaded) in seen.items():
        assert usage.startswith(f"usage: tunelab {command}"), (command, usage)
        assert loaded == [], f"tunelab {command} --help imported {loaded}"


def test_version(capsys):
    from tunelab import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"tunelab {__version__}")
