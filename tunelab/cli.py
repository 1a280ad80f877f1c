"""The `tunelab` command: one dispatch table from sub-command to the module that runs it.

    tunelab train  --do_train --dataset alpaca_gpt4_en --output_dir runs/x ...   (the 2023 flags)
    tunelab train  examples/train_lora.yaml --learning_rate 1e-4                 (file + overrides)
    tunelab eval   ... / tunelab predict ...   (= train --do_eval / --do_predict)
    tunelab study  examples/study_2023_04_24.yaml [--scale full] [--report_only]
    tunelab score  generated_predictions.jsonl
    tunelab chat | serve | webui | export ...

Each target is "module:function" taking argv and returning an exit code; modules import lazily so
`tunelab --help` stays fast and a missing optional extra only breaks its own command. Every command parses
its flags with `Parser` (below): errors are one-line TunelabErrors, and a flag may be written with dashes
(`--dry-run`, `--learning-rate`) as well as with the canonical underscores.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tunelab.errors import TunelabError

ALIAS_NOTE = "Every --option_name may also be written --option-name."


def underscored(argv: list[str], known) -> list[str]:
    """argv with each dashed flag (`--dry-run`, `--dry-run=x`) written as the known underscore flag it
    aliases (`--dry_run`); anything else, and everything after a bare `--`, is left as it is."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
            continue
        name, sep, value = arg[2:].partition("=")
        flag = "--" + name.replace("-", "_")
        if flag in known:
            out[i] = flag + sep + value
    return out


class Parser(argparse.ArgumentParser):
    """The argparse every tunelab command uses: raises TunelabError instead of printing usage and exiting
    (the CLI prints it as one line), reads `--option-name` as `--option_name`, and takes no abbreviations
    (`--learning_rat` is an unknown option naming the closest ones, not --learning_rate)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", ALIAS_NOTE)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse hook
        raise TunelabError(message)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(underscored(args, self._option_string_actions), namespace)


COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tunelab.train:main", "Fine-tune (or --do_eval / --do_predict) with the 2023 toolkit's flags."),
    "eval": ("tunelab.train:main_eval", "Score a model/checkpoint: loss, BLEU-4, ROUGE-1/2/L."),
    "predict": ("tunelab.train:main_predict", "Like eval, and write generated_predictions.jsonl."),
    "score": ("tunelab.metrics:main", "Score any predictions .jsonl file with the 2023 formula."),
    "study": ("tunelab.study.cli:main", "Run a grid of fine-tuning runs and write a report."),
    "chat": ("tunelab.chat:main", "Terminal chat with a base model plus checkpoints."),
    "serve": ("tunelab.serve:main", "OpenAI-compatible HTTP API."),
    "webui": ("tunelab.webui:main", "Local gradio chat page."),
    "export": ("tunelab.export:main", "Merge a checkpoint into a standalone HF model directory."),
}


def _usage() -> str:
    lines = ["usage: tunelab <command> [options]   (tunelab <command> --help for its options)",
             "       tunelab --version", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _version() -> str:
    import platform

    from tunelab import __version__

    return f"tunelab {__version__} (python {platform.python_version()})"


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# Commands whose hot loops allocate many short-lived tensors on the CPU: they run under tcmalloc (or glibc
# told to keep freed memory); tcmalloc ran the same training step 1.4-1.7x faster than plain glibc
# (tunelab/allocator.py). TUNELAB_ALLOCATOR=system opts out.
_ALLOCATOR_COMMANDS = {"train", "eval", "predict", "study", "chat", "serve", "webui"}
_HELP_FLAGS = {"-h", "--help", "--help-all"}


def entry() -> int:
    """Console-script entry: re-executes itself once under a faster allocator (tunelab/allocator.py) for the
    commands with hot loops, then runs main()."""
    import os

    from tunelab.allocator import allocator_env, reexec

    argv = sys.argv[1:]
    hot = argv and argv[0] in _ALLOCATOR_COMMANDS and not _HELP_FLAGS & set(argv)  # help runs no hot loop
    try:
        env = allocator_env(os.environ) if hot else None
    except TunelabError as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    if env is not None:
        reexec(["-m", "tunelab", *argv], env)
    return main(argv)


def _report(command: str, err: Exception) -> bool:
    """Print `err` as one line when it is the user's input or the environment (errors.user_message); False
    for anything else (a bug, whose traceback the caller lets through). TUNELAB_DEBUG=1 also prints the
    traceback of every reported error."""
    import os
    import traceback

    from tunelab.errors import user_message

    message = user_message(err)
    if message is None:
        return False
    if os.environ.get("TUNELAB_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    print(f"tunelab {command}: error: {message}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from tunelab.errors import closest

        print(f"tunelab: unknown command '{command}': {closest(command, list(COMMANDS))}", file=sys.stderr)
        return 2
    from tunelab.logs import setup_command_logs

    setup_command_logs()  # known upstream warnings off; no progress bars when stderr is a log file
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_resolve(COMMANDS[command][0])(rest) or 0)
    except Exception as err:  # a bad input or the machine's state: one line, exit 2; a bug: its traceback
        if not _report(command, err):
            raise
        return 2
    finally:
        from tunelab import distributed

        distributed.leave()
