"""BLEU-4 and ROUGE-1/2/L exactly as the April-2023 ChatGLM-Efficient-Tuning study computed them, and
the `tunelab score` command that applies them to a predictions file.

    tunelab score runs/x/generated_predictions.jsonl [more.jsonl ...] [--output scores.json]

    from tunelab.metrics import score_corpus
    score_corpus(["我喜欢吃苹果"], ["我喜欢吃香蕉"])  # {'bleu-4': 50.8133, 'rouge-1': 75.0, ...}

The formula (hiyouga/ChatGLM-Efficient-Tuning, ComputeMetrics in src/utils/, itself from THUDM's
ChatGLM-6B ptuning/main.py), per (prediction, reference) pair:
  * BLEU-4 over *characters*: nltk `sentence_bleu([list(label)], list(pred))`, uniform 4-gram weights,
    smoothing method3. Characters include spaces and punctuation; a prediction shorter than 4
    characters cannot reach 100 even when it is exact (the smoothed 3/4-gram terms cap it).
  * ROUGE-1/2/L F-scores from rouge_chinese on jieba-segmented text joined with spaces. Its n-grams are
    sets (a repeated word counts once) and its F has +1e-8 in the denominator, so identical texts give
    99.9999995, which rounds to 100.0.
  * each score x100, rounded to 4 decimals; the corpus score is the plain mean of those (numpy, as 2023).
Empty sides, decided here (2023 would crash on an empty reference): ROUGE is 0 when either side has no
token after segmentation (empty or whitespace-only); BLEU is left to nltk, which gives 0 for an empty
prediction or reference. Whitespace is a character for BLEU, as in 2023, so a blank prediction still
matches the spaces of its reference (tunelab's own predictions are stripped).

jieba, nltk and rouge_chinese load on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from tunelab.errors import TunelabError, closest
from tunelab.names import METRIC_KEYS

_ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


@functools.cache
def _scorers():
    """(jieba, bleu, rouge), loaded once: jieba reads its dictionary (~0.5 s) and logs unless told not to."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    bleu = functools.partial(sentence_bleu, smoothing_function=SmoothingFunction().method3)
    return jieba, bleu, Rouge()


def _percent(x: float) -> float:
    return float(round(x * 100, 4))


def score_pair(pred: str, label: str) -> dict[str, float]:
    """The 2023 scores of one prediction against its reference, in percent (keys METRIC_KEYS)."""
    jieba, bleu, rouge = _scorers()
    scores = {"bleu-4": _percent(bleu([list(label)], list(pred)))}
    hypothesis = " ".join(jieba.cut(pred))
    reference = " ".join(jieba.cut(label))
    if hypothesis.split() and reference.split():
        result = rouge.get_scores(hypothesis, reference)[0]
        scores.update({key: _percent(result[key]["f"]) for key in _ROUGE_KEYS})
    else:  # rouge_chinese raises on a side with no token
        scores.update({key: 0.0 for key in _ROUGE_KEYS})
    return scores


def score_corpus(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Mean of the per-pair scores (each already rounded, as in 2023); keys METRIC_KEYS."""
    import numpy as np

    if len(preds) != len(labels):
        raise TunelabError(f"{len(preds)} predictions but {len(labels)} references")
    if not preds:
        raise TunelabError("no predictions to score")
    per_pair = [score_pair(p, l) for p, l in zip(preds, labels)]
    return {key: float(np.mean([s[key] for s in per_pair])) for key in METRIC_KEYS}


def read_predictions(path) -> tuple[list[str], list[str]]:
    """(predictions, references) from a JSON-lines file of {"predict": ..., "label": ...} objects:
    tunelab's generated_predictions.jsonl or the 2023 toolkit's generated_predictions.txt."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"predictions file not found: {path}")
    preds, labels = [], []
    # split on "\n" only: str.splitlines() would also break inside strings holding U+2028 and friends,
    # which json.dumps(ensure_ascii=False) writes raw.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        pred, label = _parse_line(line, f"{path} line {lineno}")
        preds.append(pred)
        labels.append(label)
    if not preds:
        raise TunelabError(f"{path}: no predictions (expected one JSON object per line with 'predict' and 'label')")
    return preds, labels


def _parse_line(line: str, where: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise TunelabError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(row, dict):
        raise TunelabError(f"{where}: expected a JSON object with 'predict' and 'label', got {type(row).__name__}")
    for key in ("predict", "label"):
        if key not in row:
            raise TunelabError(f"{where}: missing '{key}' (keys: {', '.join(row) or 'none'})")
        if not isinstance(row[key], str):
            raise TunelabError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    return row["predict"], row["label"]


def build_parser() -> argparse.ArgumentParser:
    from tunelab.cli import Parser

    parser = Parser(prog="tunelab score",
                    description="Score predictions files with the 2023 BLEU-4 / ROUGE-1/2/L formula.")
    parser.add_argument("files", nargs="+", help="generated_predictions.jsonl (or the 2023 .txt) files.")
    parser.add_argument("--output", help="Also write the scores of every file to this JSON file.")
    return parser


def _parse_cli(argv: list[str]) -> argparse.Namespace:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        bad = unknown[0]
        hint = closest(bad.lstrip("-").split("=", 1)[0], ["output"]) if bad.startswith("-") else ""
        raise TunelabError(f"unknown option '{bad}'" + (f": {hint}" if hint else ""))
    return args


def _table(path: str, scores: dict[str, float]) -> str:
    lines = [f"{path}  ({scores['samples']} samples)"]
    lines += [f"  {key:<8} {scores[key]:9.4f}" for key in METRIC_KEYS]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`tunelab score FILE [FILE...] [--output results.json]`: print each file's scores, optionally save."""
    args = _parse_cli(argv)
    results: dict[str, dict[str, float]] = {}
    for file in args.files:
        preds, labels = read_predictions(file)
        results[file] = {**score_corpus(preds, labels), "samples": len(preds)}
        print(_table(file, results[file]))
    if args.output:
        from tunelab.runinfo import write_json  # writes a temp file and renames: never half-written

        write_json(Path(args.output), results)
        print(f"wrote {args.output}")
    return 0
