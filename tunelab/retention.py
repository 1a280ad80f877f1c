"""Knowledge retention: score the base model on the same samples with the same decoding, and write
retention.json = {base, tuned, delta, noise} for every metric; `format_retention` is the table that
`predict --compare_base` prints. noise is the paired standard error of delta over the samples (both sides
scored the same samples): what the delta would wobble by on another draw of samples of the same size.

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
import math
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


def base_record(args: Args, base_path: str, dataset, score: Callable) -> dict[str, Any]:
    """The base model's {"metrics", "predictions", "indices"} on `dataset`, from the cache when this exact
    pass ran before. `score` is evaluate.score, passed in so that evaluate and retention do not import each
    other."""
    path = base_cache_path(args, base_path, dataset)
    if path.is_file():
        logger.info("base model scores: cache hit %s", path.name)
        return json.loads(path.read_text(encoding="utf-8"))
    from tunelab.setup import load_base

    model, tokenizer, _ = load_base(dataclasses.replace(args.model, model_name_or_path=base_path), [])
    model.eval()
    scored = score(model, tokenizer, dataset, args, generate=True, is_base=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    record = {"metrics": scored.metrics, "predictions": scored.predictions, "indices": scored.indices}
    tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return record


def base_metrics(args: Args, base_path: str, dataset, score: Callable) -> dict[str, float]:
    """The base model's metrics on `dataset` (base_record's)."""
    return base_record(args, base_path, dataset, score)["metrics"]


TABLE_KEYS = (*METRIC_KEYS, "loss", "perplexity", "nll", "kl")


def retention_table(base: dict[str, float], tuned: dict[str, float],
                    noise: dict[str, float | None] | None = None) -> dict[str, dict[str, float]]:
    keys = [k for k in TABLE_KEYS if base.get(k) is not None and tuned.get(k) is not None]
    table = {"base": {k: base[k] for k in keys}, "tuned": {k: tuned[k] for k in keys},
             "delta": {k: round(tuned[k] - base[k], 4) for k in keys}}
    if noise is not None:
        table["noise"] = {k: noise.get(k) for k in keys}
    return table


def mean_se(diffs: list[float]) -> float | None:
    """Standard error of the mean of paired differences: sd / sqrt(n); None below 2 samples."""
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def weighted_se(diffs: list[float], weights: list[float]) -> float | None:
    """Standard error of the weighted mean sum(w d) / sum(w) of paired differences (the token-weighted nll
    and kl), as a ratio estimator: sqrt(m / (m - 1) * sum((w_i (d_i - D))^2)) / sum(w); None below 2 samples."""
    m, total = len(diffs), sum(weights)
    if m < 2 or total <= 0:
        return None
    mean = sum(w * d for w, d in zip(weights, diffs)) / total
    return math.sqrt(m / (m - 1) * sum((w * (d - mean)) ** 2 for w, d in zip(weights, diffs))) / total


def paired_noise(base_pairs: dict[int, dict[str, float]], tuned_pairs: dict[int, dict[str, float]],
                 base_lines: list[dict] | None, tuned_lines: list[dict]) -> dict[str, float | None]:
    """noise of each delta: the generation scores' per-sample differences (keyed by sample index, plain
    means), nll and kl from likelihood.jsonl lines (token-weighted; the base's kl is 0 by definition), loss
    as nll, perplexity by the delta method (perplexity * se of nll)."""
    both = sorted(set(base_pairs) & set(tuned_pairs))
    noise = {k: mean_se([tuned_pairs[i][k] - base_pairs[i][k] for i in both]) for k in METRIC_KEYS}
    base_nll = {line["index"]: line["nll"] for line in base_lines or []}
    rows = [line for line in tuned_lines if line["nll"] is not None and base_nll.get(line["index"]) is not None]
    weights = [line["tokens"] for line in rows]
    diffs = [line["nll"] - base_nll[line["index"]] for line in rows]
    noise["nll"] = weighted_se(diffs, weights) if base_lines else None
    kl_rows = [line for line in tuned_lines if line.get("kl") is not None]
    noise["kl"] = weighted_se([line["kl"] for line in kl_rows], [line["tokens"] for line in kl_rows])
    noise["loss"] = noise["nll"]
    if noise["nll"] is not None and rows:
        tuned_nll = sum(w * line["nll"] for w, line in zip(weights, rows)) / sum(weights)
        noise["perplexity"] = math.exp(min(tuned_nll, 50.0)) * noise["nll"]
    return {k: None if v is None else float(f"{v:.4g}") for k, v in noise.items()}  # kl's noise can be ~1e-5


def _pair_scores(predictions: list[str] | None, indices: list[int] | None, dataset) -> dict[int, dict[str, float]]:
    from tunelab.metrics import score_pair

    if not predictions:
        return {}
    return {i: score_pair(p, dataset[i]["label"]) for p, i in zip(predictions, indices)}


def write_retention(out: Path, tuned, args: Args, base_path: str, dataset, score: Callable, base_top=None) -> dict:
    """retention.json for `tuned` (evaluate.Scored: metrics, likelihood lines, predictions and their indices)
    against the base model; `base_top` is the base pass (likelihood.BaseTopK) when there was one."""
    from tunelab.likelihood import records
    from tunelab.runinfo import write_json

    base = base_record(args, base_path, dataset, score)
    noise = paired_noise(_pair_scores(base["predictions"], base["indices"], dataset),
                         _pair_scores(tuned.predictions, tuned.indices, dataset),
                         None if base_top is None else records(base_top.scores()), tuned.likelihood)
    table = retention_table(base["metrics"], tuned.metrics, noise)
    write_json(out / RETENTION_FILE, table)
    return table


def format_retention(table: dict[str, dict[str, float]], samples: int | None = None) -> str:
    """retention.json as the small table `predict --compare_base` prints: base, tuned, delta, noise per
    score; a delta beyond 2 noise is marked *."""
    where = f" on {samples} samples" if samples else ""
    lines = [f"tuned vs base{where} (noise: paired standard error over samples; * = |delta| > 2 noise)",
             f"  {'':<12}{'base':>11}{'tuned':>11}{'delta':>11}{'noise':>10}"]
    noise = table.get("noise", {})
    for key in table["base"]:
        se = noise.get(key)
        mark = "*" if se and abs(table["delta"][key]) > 2 * se else ""
        lines.append(f"  {key:<12}{_num(table['base'][key]):>11}{_num(table['tuned'][key]):>11}"
                     f"{_num(table['delta'][key], '+'):>11}{'-' if se is None else _num(se):>10}{mark}")
    return "\n".join(lines)


def _num(x: float, sign: str = "") -> str:
    """4 decimals, or 3 significant digits for the small values kl and its noise take."""
    return f"{x:{sign}.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:{sign}.2e}"


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
