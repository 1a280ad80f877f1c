"""Reading a study's JSON files back, forgivingly: the report must build from whatever a study dir holds,
so a missing, half-written or malformed file reads as empty (the caller says what is missing). Pure over
files; shared by results.py, efficiency.py, trajectory.py, forgotten.py and runner.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.names import results_file


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; [] when it is missing or any line is malformed (a half-written file
    gives no per-sample data rather than wrong pairs)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    except OSError:
        return []
    rows = []
    for line in lines:
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                return []
            if isinstance(row, dict):
                rows.append(row)
    return rows


def number(value: Any) -> float | None:
    """A JSON value as a float when it is a number (not a bool); None otherwise."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_results(stage_dir: Path) -> dict[str, Any]:
    """An eval stage's results: predict_results.json, else eval_results.json; {} when neither is readable."""
    return read_json_object(Path(stage_dir) / results_file("predict")) or read_json_object(
        Path(stage_dir) / results_file("eval"))
