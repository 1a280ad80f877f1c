"""Knowledge retention: score the base model on the same samples with the same decoding, and write
retention.json = {base, tuned, delta} for every metric.

Base predictions are cached under `<cache>/predictions/<key>.json`, keyed by the base model's files,
the tokenized data (which covers data, template and prompt prefix) and the decoding settings, so scoring
many runs against one base costs one base pass.

The base model's likelihood pass (per-sample NLL and top-k log-probs per response position, the base side
of the KL in tunelab/likelihood.py) is cached the same way under `<cache>/likelihood/<key>.safetensors`,
keyed by the base model's files, the tokenized data, the precision and k.
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
    from tunelab.setup import base_dtype_key, decoding_record

    key = cache_key(model_fingerprint(base_path), dataset._fingerprint, decoding_record(args),
                    args.training.bf16, args.training.per_device_eval_batch_size,
                    args.generation.max_generate_samples, *base_dtype_key(args.model))
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
    scored = score(model, tokenizer, dataset, args, generate=True, is_base=True)
    metrics = scored.metrics
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    record = {"metrics": metrics, "predictions": scored.predictions, "indices": scored.indices}
    tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return metrics


def retention_table(base: dict[str, float], tuned: dict[str, float]) -> dict[str, dict[str, float]]:
    keys = [k for k in (*METRIC_KEYS, "loss", "perplexity", "nll", "kl")
            if base.get(k) is not None and tuned.get(k) is not None]
    return {"base": {k: base[k] for k in keys}, "tuned": {k: tuned[k] for k in keys},
            "delta": {k: round(tuned[k] - base[k], 4) for k in keys}}


def write_retention(out: Path, tuned: dict[str, float], args: Args, base_path: str, dataset,
                    score: Callable) -> dict:
    from tunelab.runinfo import write_json

    table = retention_table(base_metrics(args, base_path, dataset, score), tuned)
    write_json(out / RETENTION_FILE, table)
    return table


def base_likelihood_path(args: Args, base_path: str, dataset) -> Path:
    from tunelab.paths import cache_dir, cache_key
    from tunelab.setup import base_dtype_key

    key = cache_key("likelihood", model_fingerprint(base_path), dataset._fingerprint, args.training.bf16,
                    args.training.fp16, args.generation.likelihood_topk, *base_dtype_key(args.model))
    return cache_dir("likelihood") / f"{key}.safetensors"


def base_likelihood(args: Args, base_path: str, dataset, compute: Callable[[], Any]):
    """The base model's BaseTopK on `dataset` (tunelab/likelihood.py): read from the cache, or `compute()`d
    (a collective pass: every rank calls it) and cached by rank 0. Every rank takes the same branch."""
    from tunelab import distributed
    from tunelab.likelihood import BaseTopK

    path = base_likelihood_path(args, base_path, dataset)
    if all(distributed.all_gather(path.is_file())):
        logger.info("base model log-probs: cache hit %s", path.name)
        return BaseTopK.load(path)
    top = compute()
    if distributed.is_main():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        top.save(tmp, {"base_model": str(base_path), "data": str(dataset._fingerprint)})
        tmp.replace(path)
    return top
