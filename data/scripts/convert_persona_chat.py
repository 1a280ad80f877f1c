"""Convert Synthetic-Persona-Chat (CSV, CC BY 4.0) into English persona chat sets in the alpaca-with-history
layout, with the assistant speaking as "User 2".

    python3 data/scripts/convert_persona_chat.py          # rewrites the two JSON files next to the CSV
    python3 data/scripts/convert_persona_chat.py --check  # exit 1 if the shipped files differ from a fresh run

Deterministic, standard library only (csv, json, random, re). Procedure:

1. Read the CSV rows in file order; row k is conversation k (968 in Synthetic-Persona-Chat_test.csv).
2. Split "Best Generated Conversation" into lines. A line "User 1: ..." / "User 2: ..." (optionally after
   leading "*" and spaces) starts a turn. Stage directions ("[The next day]", "(After hiking)", "* * *")
   are dropped. Any other non-blank line continues the current turn (joined with "\n"); lines before the
   first turn are dropped. Turns with no text are dropped, then consecutive turns of the same speaker are
   merged (joined with " ").
3. For each User-2 turn i >= 1 write one record (the same scheme as the Chat-Haruhi derivation):
     instruction = text of turn i-1 (User 1), input = "", output = text of turn i (User 2),
     history = [[t_j, t_{j+1}] for j = (i-1)%2, (i-1)%2+2, ... < i-1]   (earlier User-1/User-2 pairs),
     system = "You are a person with this persona: " + User 2's persona lines joined with " ".
4. Split by conversation: shuffle the indices 0..N-1 with random.Random(0).shuffle; the first round(0.2*N)
   are test, the rest train. Then keep only the first MAX_TEST_CONVERSATIONS test and MAX_TRAIN_CONVERSATIONS
   train conversations of that shuffled order (so the repo's data stays small: every row repeats the
   conversation so far as history). Records are written in ascending conversation index.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE.parent / "persona" / "synthetic_persona_chat"
SOURCE = FOLDER / "Synthetic-Persona-Chat_test.csv"
TRAIN_FILE = FOLDER / "persona_chat_en_train.json"
TEST_FILE = FOLDER / "persona_chat_en_test.json"

TEST_FRACTION = 0.2
MAX_TEST_CONVERSATIONS = 30
MAX_TRAIN_CONVERSATIONS = 45
SYSTEM_PREFIX = "You are a person with this persona: "

_TURN = re.compile(r"^[*\s]*User ([12])\s*:\s*(.*)$")
_STAGE = re.compile(r"^(\[.*\]|\(.*\)|[*\s]+)$")


def parse_turns(conversation: str) -> list[tuple[str, str]]:
    """[(speaker "1"/"2", text)] with continuation lines folded in and same-speaker turns merged."""
    turns: list[list[str]] = []
    for raw in conversation.splitlines():
        line = raw.strip()
        if not line or _STAGE.match(line):
            continue
        m = _TURN.match(line)
        if m:
            turns.append([m.group(1), m.group(2).strip()])
        elif turns:
            turns[-1][1] = (turns[-1][1] + "\n" + line).strip()
    merged: list[tuple[str, str]] = []
    for speaker, text in turns:
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, merged[-1][1] + " " + text)
        else:
            merged.append((speaker, text))
    return merged


def persona_system(persona: str) -> str:
    return SYSTEM_PREFIX + " ".join(line.strip() for line in persona.splitlines() if line.strip())


def conversation_records(turns: list[tuple[str, str]], system: str) -> list[dict]:
    texts = [text for _, text in turns]
    records = []
    for i in range(1, len(turns)):
        if turns[i][0] != "2":
            continue
        history = [[texts[j], texts[j + 1]] for j in range((i - 1) % 2, i - 1, 2)]
        records.append({"instruction": texts[i - 1], "input": "", "output": texts[i], "history": history,
                        "system": system})
    return records


def split_indices(n: int) -> tuple[list[int], list[int]]:
    """(train, test) conversation indices, each capped and sorted ascending."""
    order = list(range(n))
    random.Random(0).shuffle(order)
    n_test = round(n * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return sorted(train[:MAX_TRAIN_CONVERSATIONS]), sorted(test[:MAX_TEST_CONVERSATIONS])


def convert(source: Path = SOURCE) -> tuple[list[dict], list[dict]]:
    with source.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    per_conv = [conversation_records(parse_turns(r["Best Generated Conversation"]),
                                     persona_system(r["user 2 personas"])) for r in rows]
    train_idx, test_idx = split_indices(len(rows))
    train = [rec for k in train_idx for rec in per_conv[k]]
    test = [rec for k in test_idx for rec in per_conv[k]]
    return train, test


def dumps(records: list[dict]) -> str:
    # one record per line: small diffs, and a JSON error's line number points at one record
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args(argv)
    train, test = convert()
    outputs = {TRAIN_FILE: dumps(train), TEST_FILE: dumps(test)}
    counts = {TRAIN_FILE: len(train), TEST_FILE: len(test)}
    if args.check:
        stale = [p.name for p, text in outputs.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
        print(f"{path.name}: {counts[path]} records, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
