"""Knowledge retention: score the base model on the same samples with the same decoding, and write
retention.json = {base, tuned, delta} for every metric.

Base predictions are cached under `<cache>/predictions/<key>.json`, keyed by the base model's files,
the tokenized data (which covers data, template and prompt prefix) and the decoding settings, so scoring
many runs against one base costs one base pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from tunelab.hparams import Args
from tunelab.names import METRIC_KEYS

logger = logging.getLogger(__name__)

RETENTION_FILE = "retention.json"


def model_fingerprint(path: str) -> dict[str, Any]:
    """Identity of a model directory: its weight/config files' names, sizes and mtimes."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json")) if p.is_dir() else []
    return {"path": str(p.resolve()), "files": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]}


def base_cache_path(args: Args, base_path: str, dataset) -> Path:
    from tunelab.paths import cache_dir, cache_key
    from tunelab.setup import decoding_record

    key = cache_key(model_fingerprint(base_path), dataset._fingerprint, decoding_record(args),
                    args.training.bf16, args.training.per_device_eval_batch_size)
    return cache_dir("predictions") / f"{key}.json"


def base_metrics(args: Args, base_path: str, dataset, score: Callable) -> dict[str, float]:
    """The base model's metrics on `dataset`, from the cache when this exact pass ran before. `score` is
    evaluate.score, passed in so that evaluate and retention do not import each other."""
    path = base_cache_path(args, base_path, dataset)
    if path.is_file():
        logger.info("base model scores: cache hit %s", path.name)
        return json.loads(path.read_text(encoding="utf-8"))["metrics"]
    from tunelab.setup import load_base

    model, tokenizer, _ = load_base(dataclasses.replace(args.model, model_name_or_path=base_path), [])
    model.eval()
    metrics, preds = score(model, tokenizer, dataset, args, generate=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "predictions": preds}, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return metrics


def retention_table(base: dict[str, float], tuned: dict[str, float]) -> dict[str, dict[str, float]]:
    keys = [k for k in (*METRIC_KEYS, "loss", "perplexity") if k in base and k in tuned]
    return {"base": {k: base[k] for k in keys}, "tuned": {k: tuned[k] for k in keys},
            "delta": {k: round(tuned[k] - base[k], 4) for k in keys}}


def write_retention(out: Path, tuned: dict[str, float], args: Args, base_path: str, dataset,
                    score: Callable) -> dict:
    from tunelab.runinfo import write_json

    table = retention_table(base_metrics(args, base_path, dataset, score), tuned)
    write_json(out / RETENTION_FILE, table)
    return table
