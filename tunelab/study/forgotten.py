""""What was forgotten": per trained row, the retention-set samples whose reference answer became least
likely against the base model — the largest per-sample rises of reference NLL (nats/token) in the
rows' likelihood.jsonl files — with the prompt, the reference, and the base model's and the row's
answers where they were generated (generated_predictions.jsonl of the base row and of the row, paired
by "index"; files without "index" are in sample order). Pure over files; the report renders it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.names import LIKELIHOOD_FILE
from tunelab.study.trajectory import read_likelihood

PREDICTIONS_FILE = "generated_predictions.jsonl"
TOP = 5


@dataclass
class Sample:
    """One sample the row forgot: its NLL under the base model and the row, and the texts we have."""

    index: int
    base_nll: float
    row_nll: float
    prompt: str | None = None
    reference: str | None = None
    base_answer: str | None = None
    row_answer: str | None = None

    @property
    def rise(self) -> float:
        return self.row_nll - self.base_nll


@dataclass
class RowForgotten:
    row_id: int
    name: str
    seed: int
    samples: list[Sample]
    scored: int  # samples both the base and the row scored


def read_predictions(path: Path) -> dict[int, dict[str, Any]]:
    """generated_predictions.jsonl as {sample index: record}; {} when missing."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
    except (OSError, ValueError):
        return {}
    return {int(r.get("index", i)): r for i, r in enumerate(records) if isinstance(r, dict)}


def most_forgotten(base: dict[int, dict], row: dict[int, dict], base_preds: dict[int, dict],
                   row_preds: dict[int, dict], top: int = TOP) -> list[Sample]:
    """The `top` samples with the largest NLL rise (row - base), largest first; only rises > 0."""
    samples = []
    for i in set(base) & set(row):
        b, r = base[i].get("nll"), row[i].get("nll")
        if isinstance(b, (int, float)) and isinstance(r, (int, float)) and r > b:
            samples.append(Sample(i, float(b), float(r)))
    samples.sort(key=lambda s: (-s.rise, s.index))
    for s in samples[:top]:
        texts = row_preds.get(s.index) or base_preds.get(s.index) or {}
        s.prompt, s.reference = texts.get("prompt"), texts.get("label")
        s.base_answer = (base_preds.get(s.index) or {}).get("predict")
        s.row_answer = (row_preds.get(s.index) or {}).get("predict")
    return samples[:top]


def read_forgotten(study_dir: Path, entries: list[dict[str, Any]], retention_set: str | None,
                   top: int = TOP) -> list[RowForgotten]:
    """Every finished trained (row, seed) with likelihood files; [] without a base row or those files."""
    base_entry = next((e for e in entries if e["id"] == 0), None)
    if base_entry is None or retention_set is None:
        return []
    base_dir = study_dir / base_entry["dir"] / retention_set
    base = read_likelihood(base_dir / LIKELIHOOD_FILE)
    if base is None:
        return []
    base_preds = read_predictions(base_dir / PREDICTIONS_FILE)
    out = []
    for entry in entries:
        row_dir = study_dir / entry["dir"] / retention_set
        row = read_likelihood(row_dir / LIKELIHOOD_FILE) if entry["id"] != 0 else None
        if row is None:
            continue
        samples = most_forgotten(base, row, base_preds, read_predictions(row_dir / PREDICTIONS_FILE), top)
        out.append(RowForgotten(entry["id"], entry["name"], entry["seed"], samples, len(set(base) & set(row))))
    return out
