"""The measurements behind a study's efficiency figures, taken once per `tunelab study` session before
the first row runs (a few seconds): the machine's matmul peak in the study's precision, the model's
parameter counts (a meta-device copy: no weights loaded) and the token counts of every stage's data
(tunelab's own tokenization, whose content-keyed cache the rows then reuse). From them, each row's
planned FLOPs (tunelab/study/efficiency.py) for the ETA. Edges only: the arithmetic is in efficiency.py.

The peak is the best median GFLOP/s of repeated `torch.mm(a, b, out=c)` over a few square sizes
(2 n^3 FLOPs each; `out=` keeps the allocator out of it): bf16 where the study computes in bf16 autocast
(a GPU asked for bf16/fp16, or a CPU with fast bf16 unless `bf16: false`), else fp32. bench/matmul.py
measures the same way over more sizes.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from tunelab.study.efficiency import (EvalTokens, ModelShape, lowest_trainable_layer, planned_row_flops, train_steps,
                                      with_lower_layer_cache)

logger = logging.getLogger(__name__)

CPU_SIZES = (1024, 2048)
GPU_SIZES = (4096, 8192)
STRIP = ("output_dir", "checkpoint_dir", "seed", "do_train", "do_eval", "do_predict", "predict_with_generate")


def matmul_gflops(m: int, k: int, n: int, dtype, seconds: float) -> float:
    """Median GFLOP/s of (m x k) @ (k x n) over repeats filling about `seconds`."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    c = torch.empty(m, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b, out=c)  # warm-up: kernel selection, page faults
    sync()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        rates.append(2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def measure_peak(precision: str, seconds: float = 2.0) -> float:
    """The machine's matmul peak in GFLOP/s for `precision` (bf16 or fp32), in about `seconds`."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = GPU_SIZES if torch.cuda.is_available() else CPU_SIZES
    return max(matmul_gflops(n, n, n, dtype, seconds / len(sizes)) for n in sizes)


def study_precision(cfg: dict[str, Any]) -> str:
    """bf16 or fp32: what a stage with these options computes in (tunelab.train.resolve_precision)."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if cfg.get("bf16") or cfg.get("fp16") else "fp32"
    if cfg.get("bf16") is False:
        return "fp32"
    from tunelab.setup import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


def model_shape(model_name_or_path: str | None) -> tuple[ModelShape, Any]:
    """(parameter counts per layer / body / head, tokenizer) of a model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.model import load_tokenizer, resolve_model_path
    from tunelab.targets import layer_of

    path = resolve_model_path(model_name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    layers: dict[int, int] = {}
    other = 0
    for name, param in model.named_parameters():  # tied weights once
        if id(param) in embeddings:
            continue
        layer = layer_of(name)
        if layer is None:
            other += param.numel()
        else:
            layers[layer] = layers.get(layer, 0) + param.numel()
    head = model.get_output_embeddings().weight.numel() if model.get_output_embeddings() is not None else 0
    shape = ModelShape(tuple(layers[i] for i in sorted(layers)), other, head)
    return shape, load_tokenizer(path)


def _key(cfg: dict[str, Any]) -> str:
    import json

    return json.dumps({k: v for k, v in cfg.items() if k not in STRIP}, sort_keys=True, default=str)


def train_tokens(cfg: dict[str, Any], tokenizer) -> tuple[float, int, float]:
    """(tokens over all epochs, optimizer steps, supervised positions over all epochs) of a training stage's
    data (supervised: what the output projection runs over, tunelab.trainer.supervised_tokens)."""
    from tunelab.hparams import parse_args
    from tunelab.preprocess import build_dataset
    from tunelab.trainer import supervised_tokens

    args = parse_args(config={k: v for k, v in cfg.items() if k != "checkpoint_dir"})
    rows = build_dataset(args.data, tokenizer, "train")
    per_epoch = sum(len(ids) for ids in rows["input_ids"])
    supervised = supervised_tokens(rows["labels"])
    t = args.training
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if t.max_steps and t.max_steps > 0:  # a step budget instead of epochs
        epochs = t.max_steps / max(train_steps(len(rows), batch, 1), 1)
        return per_epoch * epochs, t.max_steps, supervised * epochs
    epochs = t.num_train_epochs
    return per_epoch * epochs, train_steps(len(rows), batch, epochs), supervised * epochs


def finetune_args(cfg: dict[str, Any], _tokenizer=None):
    """The method options of a stage (FinetuningArguments), parsed from its method keys alone."""
    from tunelab.hparams import parse_args

    return parse_args(config=_method_options(cfg)).finetune


def _method_options(cfg: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import fields

    from tunelab.hparams import FinetuningArguments

    return {k: v for k, v in cfg.items() if k in {f.name for f in fields(FinetuningArguments)}}


def _data_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stage's options less its method's: what its token counts and step count depend on, so rows
    that differ only in method share one tokenization."""
    method = _method_options(cfg)
    return {k: v for k, v in cfg.items() if k not in method}


def eval_tokens(cfg: dict[str, Any], tokenizer) -> EvalTokens:
    """Token counts of an eval stage's data (prompt, reference, both) and how much it will generate."""
    from tunelab.hparams import parse_args
    from tunelab.preprocess import build_dataset

    args = parse_args(config={k: v for k, v in cfg.items() if k != "checkpoint_dir"})
    rows = build_dataset(args.data, tokenizer, "eval")
    reference = sum(sum(1 for t in labels if t != -100) for labels in rows["full_labels"])
    limit = getattr(args.generation, "max_generate_samples", None)  # the contract's option, where it exists
    return EvalTokens(samples=len(rows), scored=sum(len(ids) for ids in rows["full_input_ids"]), reference=reference,
                      prompt=sum(len(ids) for ids in rows["input_ids"]),
                      generated_samples=min(limit, len(rows)) if limit else len(rows),
                      max_new_tokens=args.generation.max_new_tokens)


def plan_rows(plans, shape: ModelShape, tokenizer, cache: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{row dir: {"train_tokens", "flops": {train, scoring, generation}}} for every plan. Token counts are
    computed once per distinct data config; pass the same `cache` dict to reuse them across calls (the
    --budget fit plans the grid at several sizes, tunelab/study/sizing.py)."""
    cache = {} if cache is None else cache

    def cached(fn, cfg):
        key = fn.__name__ + _key(cfg)
        if key not in cache:
            cache[key] = fn(cfg, tokenizer)
        return cache[key]

    out, seen = {}, set()  # seen: (data, k) whose layer-k inputs an earlier row caches
    for plan in plans:
        tokens, lowest, trainable, points, ft, supervised = None, 0, 0, 0, None, 0.0
        if plan.train:
            tokens, steps, supervised = cached(train_tokens, _data_options(plan.train))
            ft = cached(finetune_args, _method_options(plan.train))
            lowest, trainable = _planned_trainable(ft, shape)
            points = max(steps - 1, 0) // plan.eval_every if plan.eval_every else 0
        evals = [(cached(eval_tokens, _data_options(cfg)), bool(cfg.get("predict_with_generate")))
                 for cfg in plan.evals.values()]
        flops = planned_row_flops(shape, tokens, lowest, trainable, evals, points, supervised)
        if ft is not None and _lower_layers_cached(ft, lowest, plan.train):
            keys = [("train", _key(_data_options(plan.train)), lowest)]
            keys += [("eval", _key(_data_options(cfg)), lowest) for cfg in plan.evals.values()]
            first = [key not in seen for key in keys]
            seen.update(keys)
            epochs = float(plan.train.get("num_train_epochs", 3.0))
            flops = with_lower_layer_cache(flops, shape, lowest, (tokens, epochs, first[0]),
                                           [(t, f) for (t, _), f in zip(evals, first[1:])], points)
        out[plan.dir] = {"train_tokens": tokens, "flops": flops}
    return out


def _lower_layers_cached(ft, lowest: int, train: dict[str, Any]) -> bool:
    """Whether the row's training and likelihood passes run on cached layer-`lowest` inputs (layer_cache.py:
    LoRA/Freeze above layer 0, the cache switched on, no step budget that would make epochs meaningless here)."""
    from tunelab.layer_cache import CACHED_METHODS, cache_switched_on

    steps = train.get("max_steps")
    return (ft.finetuning_type in CACHED_METHODS and lowest > 0 and not (steps and int(steps) > 0)
            and cache_switched_on(ft.cache_lower_layers, train.get("torch_compile"), train.get("deepspeed"),
                                  train.get("fsdp")))


def _planned_trainable(f, shape: ModelShape) -> tuple[int, int]:
    """(lowest trainable layer, trainable parameters) expected from a row's method options, before it
    trains: Freeze and full count whole layers (an upper bound), LoRA and P-Tuning v2 add few parameters (0)."""
    from tunelab.targets import freeze_layers, parse_layer_spec

    n = len(shape.layers)
    if f.finetuning_type in ("full", "p_tuning"):
        return 0, shape.body if f.finetuning_type == "full" else 0
    if f.target_layers:
        layers = parse_layer_spec(f.target_layers, n)
    elif f.finetuning_type == "freeze":
        layers = freeze_layers(f.num_layer_trainable, n)
    else:
        layers = list(range(n))
    trainable = sum(shape.layers[i] for i in layers) if f.finetuning_type == "freeze" else 0
    return lowest_trainable_layer(f.finetuning_type, layers), trainable


def calibrate(plans, devices: int = 1) -> dict[str, Any]:
    """The study's calibration record (efficiency.json "calibration"). Never raises: what could not be
    measured is left out and named under "errors", and the progress view falls back to row times."""
    record: dict[str, Any] = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "devices": devices, "errors": []}
    cfg = next((p.train for p in plans if p.train), None) or next(iter(plans[0].evals.values()))
    try:
        shape, tokenizer = model_shape(cfg.get("model_name_or_path"))
        record["model"] = shape.to_dict()
        record["rows"] = plan_rows(plans, shape, tokenizer)
        record["precision"] = study_precision(cfg)
        record["peak_gflops"] = round(measure_peak(record["precision"]), 1)
    except Exception as err:  # an ETA is a convenience: never stop a study for it
        logger.warning("study calibration incomplete: %s: %s", type(err).__name__, err)
        record["errors"].append(f"{type(err).__name__}: {err}")
    return record
