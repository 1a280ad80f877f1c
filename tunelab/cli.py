"""The `tunelab` command: one dispatch table from sub-command to the module that runs it.

    tunelab train  --do_train --dataset alpaca_gpt4_en --output_dir runs/x ...   (the 2023 flags)
    tunelab train  cfg.yaml --learning_rate 1e-4                                  (file + overrides)
    tunelab eval   ... / tunelab predict ...   (= train --do_eval / --do_predict)
    tunelab study  examples/study_2023_04_24.yaml [--scale full] [--report-only]
    tunelab score  generated_predictions.jsonl
    tunelab chat | serve | webui | export ...

Each target is "module:function" taking argv and returning an exit code; modules import lazily so
`tunelab --help` stays fast and a missing optional extra only breaks its own command.
"""

from __future__ import annotations

import importlib
import logging
import sys

from tunelab.errors import TunelabError

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
    lines = ["usage: tunelab <command> [options]   (tunelab <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# Commands whose hot loops allocate many short-lived tensors on the CPU: they run under tcmalloc (or glibc
# told to keep freed memory); tcmalloc ran the same training step 1.4-1.7x faster than plain glibc
# (tunelab/allocator.py). TUNELAB_ALLOCATOR=system opts out.
_ALLOCATOR_COMMANDS = {"train", "eval", "predict", "study", "chat", "serve", "webui"}


def entry() -> int:
    """Console-script entry: re-executes itself once under a faster allocator (tunelab/allocator.py) for the
    commands with hot loops, then runs main()."""
    import os

    from tunelab.allocator import allocator_env, reexec

    argv = sys.argv[1:]
    try:
        env = allocator_env(os.environ) if argv and argv[0] in _ALLOCATOR_COMMANDS else None
    except TunelabError as err:
        print(f"tunelab: error: {err}", file=sys.stderr)
        return 2
    if env is not None:
        reexec(["-m", "tunelab", *argv], env)
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from tunelab.errors import closest

        print(f"tunelab: unknown command '{command}': {closest(command, list(COMMANDS))}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_resolve(COMMANDS[command][0])(rest) or 0)
    except TunelabError as err:
        print(f"tunelab {command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from tunelab import distributed

        distributed.leave()
