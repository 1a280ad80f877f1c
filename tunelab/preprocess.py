"""Tokenized data sets for training and eval, built once per content and cached on disk.

    from tunelab.preprocess import build_dataset
    train = build_dataset(args.data, tokenizer, "train")  # input_ids, labels (-100 on prompt tokens)
    evals = build_dataset(args.data, tokenizer, "eval")   # input_ids (prompt only), prompt (text), label (response
                                                          # text), full_input_ids / full_labels (train-style, for loss)

The cache lives in `tunelab.paths.cache_dir("datasets")/<key>` (datasets' save_to_disk format). The key,
`dataset_fingerprint`, hashes everything that changes the result: each data file's bytes and registry entry,
the data options (dataset list, max_samples, template, source_prefix, max lengths, identity fills), the stage,
the format code version and the tokenizer (vocabulary/merges, special tokens, chat template). A hit loads
from disk; --overwrite_cache rebuilds. A cache entry is written to a temporary folder and renamed into
place, so an interrupted run never leaves a half-written one. The returned dataset's `_fingerprint` derives
from the key alone, so it is stable across runs (the base-predictions cache in tunelab/retention.py keys on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data import (DataStats, Example, SetCounts, data_file, dataset_names, get_entry, load_dataset_info,
                          load_examples, resolve_dataset_dir)
from tunelab.errors import TunelabError
from tunelab.names import PROMPT_OPTIONS
from tunelab.templates import TEMPLATE_VERSION, Template, get_template, start_ids

if TYPE_CHECKING:
    import datasets

    from tunelab.hparams import DataArguments

logger = logging.getLogger(__name__)

STAGES = ("train", "eval")
DATA_VERSION = 1  # bump when loading/normalisation or the row layout below changes (part of the cache key)
STATS_FILE = "tunelab_data_stats.json"
# Data options that change the tokenized rows (the dataset list itself enters the key in order, per set).
KEY_OPTIONS = ("max_samples", "max_target_length", *PROMPT_OPTIONS)  # order-free: the key is sorted JSON


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: its full serialisation (or vocabulary), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
             "special": list(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)),
             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "start": start_ids(tokenizer)}
    return _sha256(body.encode() + json.dumps(extra, sort_keys=True, default=str).encode())


def dataset_fingerprint(data_args: DataArguments, tokenizer, stage: str) -> str:
    """The cache key of `build_dataset(data_args, tokenizer, stage)` (32 hex digits)."""
    dataset_dir = resolve_dataset_dir(data_args.dataset_dir)
    info = load_dataset_info(dataset_dir)
    sets = []
    for name in dataset_names(data_args.dataset):
        entry = get_entry(info, name, dataset_dir)
        content = data_file(entry, dataset_dir, name).read_bytes()
        sets.append({"name": name, "entry": entry, "sha256": _sha256(content)})
    parts = {"sets": sets, "options": {k: getattr(data_args, k) for k in KEY_OPTIONS}, "stage": stage,
             "versions": [DATA_VERSION, TEMPLATE_VERSION], "tokenizer": tokenizer_fingerprint(tokenizer)}
    return _sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode())[:32]


# ---------------------------------------------------------------- rows

def example_row(ex: Example) -> dict[str, Any]:
    return {"prompt": ex.prompt, "query": ex.query, "response": ex.response,
            "history": [list(pair) for pair in ex.history], "system": ex.system}


def row_example(row: dict[str, Any]) -> Example:
    return Example(prompt=row["prompt"], query=row["query"], response=row["response"],
                   history=tuple((q, r) for q, r in row["history"] or ()), system=row["system"])


def encode_train_row(row: dict[str, Any], template: Template, tokenizer, data_args: DataArguments) -> dict:
    input_ids, labels = template.encode_train(tokenizer, row_example(row), data_args.source_prefix,
                                              data_args.max_source_length, data_args.max_target_length)
    return {"input_ids": input_ids, "labels": labels}


def encode_eval_row(row: dict[str, Any], template: Template, tokenizer, data_args: DataArguments) -> dict:
    """Prompt ids for generation, the texts for the predictions file, and the train-style ids for loss."""
    ex = row_example(row)
    # the prompt text shows the turns the model sees (long histories lose their oldest turns)
    fitted, prompt_ids = template.fit(tokenizer, ex, data_args.source_prefix, data_args.max_source_length)
    full_ids, full_labels = template.encode_train(tokenizer, ex, data_args.source_prefix,
                                                  data_args.max_source_length, data_args.max_target_length)
    return {"input_ids": prompt_ids, "prompt": template.render_prompt(fitted, data_args.source_prefix),
            "label": ex.response, "full_input_ids": full_ids, "full_labels": full_labels}


def tokenize(examples: list[Example], template: Template, tokenizer, data_args: DataArguments, stage: str,
             fingerprint: str) -> datasets.Dataset:
    from datasets import Dataset

    raw = Dataset.from_list([example_row(ex) for ex in examples])
    workers = data_args.preprocessing_num_workers
    return raw.map(encode_train_row if stage == "train" else encode_eval_row,
                   fn_kwargs={"template": template, "tokenizer": tokenizer, "data_args": data_args},
                   remove_columns=raw.column_names, num_proc=workers if workers and workers > 1 else None,
                   new_fingerprint=fingerprint, desc=f"tokenize ({stage})")


# ---------------------------------------------------------------- cache

def _save(dataset: datasets.Dataset, stats: DataStats, path: Path, replace: bool) -> None:
    """Write to a temporary folder, then rename into place. An existing entry is replaced only when `replace`
    (--overwrite_cache); otherwise another process built the same content meanwhile and its entry stays."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / STATS_FILE).write_text(json.dumps(stats.to_dict(), ensure_ascii=False), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    if replace and path.exists():
        path.rename(old)
    try:
        tmp.rename(path)
    except OSError:  # the entry exists (same content): keep it
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def cached_stats(path: Path) -> DataStats | None:
    stats_file = path / STATS_FILE
    if not stats_file.is_file():
        return None
    counts = json.loads(stats_file.read_text(encoding="utf-8"))
    return DataStats({name: SetCounts(**c) for name, c in counts.items()})


def build_dataset(data_args: DataArguments, tokenizer, stage: str) -> datasets.Dataset:
    """The tokenized rows of `data_args.dataset` for `stage` ("train" or "eval"), from the cache when possible."""
    from datasets import load_from_disk

    from tunelab.paths import cache_dir

    if stage not in STAGES:
        raise TunelabError(f"unknown data stage '{stage}': valid: {', '.join(STAGES)}")
    template = get_template(data_args.template, tokenizer)  # fails on a bad template before any work
    key = dataset_fingerprint(data_args, tokenizer, stage)
    path = cache_dir("datasets") / key
    if path.is_dir() and not data_args.overwrite_cache:
        logger.info("tokenized data: cache hit %s", key)
        stats = cached_stats(path)
        if stats is not None:
            logger.info(stats.summary())
        return load_from_disk(str(path))
    examples, stats = load_examples(data_args)
    logger.info(stats.summary())
    dataset = tokenize(examples, template, tokenizer, data_args, stage, key)
    _save(dataset, stats, path, replace=data_args.overwrite_cache)
    logger.info("tokenized data: %d %s rows cached as %s", len(dataset), stage, key)
    return load_from_disk(str(path))


# ---------------------------------------------------------------- eval data during training

def val_count(val_size: float, rows: int) -> int:
    """How many of `rows` training rows --val_size holds out: a fraction (< 1, rounded up, as datasets'
    train_test_split does) or a number of rows; at least one row must be left to train on."""
    if not val_size:
        return 0
    count = math.ceil(val_size * rows) if val_size < 1 else int(val_size)
    if count >= rows:
        raise TunelabError(f"--val_size {val_size:g} holds out {count} of the {rows} training rows, leaving none to "
                           "train on: give a smaller fraction or count")
    return count


def split_for_eval(dataset: datasets.Dataset, val_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): --val_size rows held out of the tokenized training rows, picked by a permutation seeded
    with `seed` (the same split for the same seed and data), disjoint; both keep the data set's row order.
    In memory, so the shared tokenized-data cache entry is never written to."""
    import numpy as np

    held = np.random.default_rng(seed).permutation(len(dataset))[:val_count(val_size, len(dataset))]
    is_held = np.zeros(len(dataset), dtype=bool)
    is_held[held] = True
    return (dataset.select(np.flatnonzero(~is_held), keep_in_memory=True),
            dataset.select(np.flatnonzero(is_held), keep_in_memory=True))
