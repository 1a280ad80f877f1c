"""`tunelab chat`: talk to a base model plus tunelab checkpoints in the terminal, answers streamed.

    tunelab chat --checkpoint_dir runs/x                     # the run's base model, template, source_prefix
    tunelab chat --model_name_or_path path/to/model --max_new_tokens 128 --do_sample --temperature 0.7
    printf 'Hi\\nWho are you?\\n' | tunelab chat --checkpoint_dir runs/x    # scripted: one answer per line

Type `clear` to start a new conversation, `exit` or `stop` to quit. With a pipe on stdin each input line
gets exactly one output line (the answer, with newlines written as \\n and backslashes as \\\\, so line i
of the output answers line i of the input); `clear` prints nothing and the end of input quits.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from tunelab.hparams import parse_args

if TYPE_CHECKING:
    from tunelab.engine import ChatEngine

CLEAR, QUIT = ("clear",), ("exit", "stop")


def one_line(text: str) -> str:
    """An answer on one line, reversibly: backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def run(engine: ChatEngine, stdin: TextIO, stdout: TextIO, interactive: bool) -> None:
    history: list[tuple[str, str]] = []
    if interactive:
        print("tunelab chat: `clear` starts over, `exit` or `stop` quits.", file=stdout)
    while True:
        if interactive:
            print("\nUser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in QUIT:
            break
        if query.lower() in CLEAR:
            history = []
            if interactive:
                print("(history cleared)", file=stdout)
            continue
        history.append((query, answer(engine, query, history, stdout, interactive)))


def answer(engine: ChatEngine, query: str, history: list, stdout: TextIO, interactive: bool) -> str:
    """Stream one answer to stdout; returns it (for the history)."""
    if interactive:
        print("Assistant: ", end="", file=stdout, flush=True)
    from tunelab.engine import to_messages

    gen = engine.stream(to_messages(query, history))
    for piece in gen:
        print(piece if interactive else one_line(piece), end="", file=stdout, flush=True)
    print(file=stdout, flush=True)
    return gen.reply.text


def main(argv: list[str]) -> int:
    args = parse_args(argv, prog="tunelab chat")  # before importing the engine (transformers): --help is fast
    from tunelab.engine import ChatEngine

    engine = ChatEngine.from_args(args)
    try:
        run(engine, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    except KeyboardInterrupt:
        print(file=sys.stdout)
    finally:
        engine.scheduler.wait_idle(timeout=30)  # the batch worker ends before the interpreter does
    return 0
