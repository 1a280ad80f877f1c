"""Tokenized data sets and their cache (tunelab/preprocess.py): train/eval columns, a second call is a cache
hit that tokenizes nothing, --overwrite_cache rebuilds, the key follows every option that changes the rows
and no others, and a failed write leaves no cache entry."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from tunelab import preprocess
from tunelab.errors import TunelabError
from tunelab.hparams import DataArguments
from tunelab.paths import cache_dir
from tunelab.preprocess import build_dataset, dataset_fingerprint
from tunelab.templates import IGNORE_INDEX


@pytest.fixture
def data_args(tiny_data_dir):
    return DataArguments(dataset="tiny", dataset_dir=str(tiny_data_dir), max_source_length=256, max_target_length=64)


def count_loads(monkeypatch) -> list[int]:
    """Counts calls of the loader that a cache hit must skip."""
    calls = []
    real = preprocess.load_examples

    def counted(args):
        calls.append(1)
        return real(args)

    monkeypatch.setattr(preprocess, "load_examples", counted)
    return calls


def test_train_rows_mask_the_prompt(data_args, tiny_tokenizer):
    ds = build_dataset(data_args, tiny_tokenizer, "train")
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 16
    row = ds[1]
    n = row["labels"].count(IGNORE_INDEX)
    assert row["labels"][:n] == [IGNORE_INDEX] * n and row["labels"][n:] == row["input_ids"][n:]
    assert tiny_tokenizer.decode(row["input_ids"][n:]) == "Hello 1! I am fine, thank you.<|im_end|>\n"


def test_eval_rows_hold_prompt_ids_texts_and_train_style_ids(data_args, tiny_tokenizer):
    ds = build_dataset(data_args, tiny_tokenizer, "eval")
    assert sorted(ds.column_names) == ["full_input_ids", "full_labels", "input_ids", "label", "prompt"]
    row = ds[0]  # has history
    assert row["label"] == "Hello 0! I am fine, thank you."
    assert row["prompt"].startswith("<|im_start|>user\n你好<|im_end|>") and row["prompt"].endswith("assistant\n")
    assert tiny_tokenizer.decode(row["input_ids"]) == row["prompt"]
    n = len(row["input_ids"])
    assert row["full_input_ids"][:n] == row["input_ids"] and row["full_labels"][:n] == [IGNORE_INDEX] * n


def test_eval_prompt_text_shows_the_turns_the_model_sees(data_args, tiny_tokenizer):
    short = dataclasses.replace(data_args, max_source_length=40)
    row = build_dataset(short, tiny_tokenizer, "eval")[0]   # its one history turn does not fit
    assert row["prompt"] == "<|im_start|>user\nSay hello number 0.<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(row["input_ids"]) == row["prompt"]
    assert row["full_input_ids"][:len(row["input_ids"])] == row["input_ids"]


def test_second_call_is_a_cache_hit(data_args, tiny_tokenizer, monkeypatch, caplog):
    calls = count_loads(monkeypatch)
    first = build_dataset(data_args, tiny_tokenizer, "train")
    key = dataset_fingerprint(data_args, tiny_tokenizer, "train")
    assert (cache_dir("datasets") / key).is_dir()
    with caplog.at_level(logging.INFO, logger="tunelab.preprocess"):
        second = build_dataset(data_args, tiny_tokenizer, "train")
    assert calls == [1]
    assert f"tokenized data: cache hit {key}" in caplog.text
    assert "tiny: 16 loaded, 16 kept, 0 skipped (empty)" in caplog.text   # stats survive in the cache
    assert second.to_list() == first.to_list() and second._fingerprint == first._fingerprint


def test_overwrite_cache_rebuilds(data_args, tiny_tokenizer, monkeypatch):
    calls = count_loads(monkeypatch)
    first = build_dataset(data_args, tiny_tokenizer, "eval")
    again = build_dataset(dataclasses.replace(data_args, overwrite_cache=True), tiny_tokenizer, "eval")
    assert calls == [1, 1]
    assert again.to_list() == first.to_list() and again._fingerprint == first._fingerprint
    leftovers = [p.name for p in cache_dir("datasets").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("change", [
    {"source_prefix": "You are Yui."}, {"template": "chatglm"}, {"template": "plain"}, {"max_samples": 4},
    {"max_source_length": 16}, {"max_target_length": 8}, {"identity_name": "Yui"}, {"dataset": "tiny,tiny"},
])
def test_key_follows_options_that_change_the_rows(data_args, tiny_tokenizer, change):
    base = dataset_fingerprint(data_args, tiny_tokenizer, "train")
    assert dataset_fingerprint(dataclasses.replace(data_args, **change), tiny_tokenizer, "train") != base


def test_key_ignores_options_that_do_not(data_args, tiny_tokenizer):
    base = dataset_fingerprint(data_args, tiny_tokenizer, "train")
    same = dataclasses.replace(data_args, overwrite_cache=True, preprocessing_num_workers=4)
    assert dataset_fingerprint(same, tiny_tokenizer, "train") == base
    assert dataset_fingerprint(data_args, tiny_tokenizer, "eval") != base


def test_key_follows_file_content_and_tokenizer(data_args, tiny_tokenizer, tiny_data_dir):
    base = dataset_fingerprint(data_args, tiny_tokenizer, "train")
    other = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    assert dataset_fingerprint(data_args, other, "train") == base   # same tokenizer, loaded again
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert dataset_fingerprint(data_args, other, "train") != base
    path = tiny_data_dir / "tiny.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    rows[0]["output"] += "!"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert dataset_fingerprint(data_args, tiny_tokenizer, "train") != base


def test_worker_processes_give_the_same_rows(data_args, tiny_tokenizer):
    single = build_dataset(data_args, tiny_tokenizer, "train").to_list()
    multi = build_dataset(dataclasses.replace(data_args, preprocessing_num_workers=2, overwrite_cache=True),
                          tiny_tokenizer, "train").to_list()
    assert multi == single


def test_failed_write_leaves_no_cache_entry(data_args, tiny_tokenizer, monkeypatch):
    from datasets import Dataset

    def broken(self, path, **kw):
        (__import__("pathlib").Path(path) / "partial.arrow").parent.mkdir(parents=True, exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(data_args, tiny_tokenizer, "train")
    assert list(cache_dir("datasets").iterdir()) == []
    monkeypatch.undo()
    assert len(build_dataset(data_args, tiny_tokenizer, "train")) == 16


def test_bad_stage_and_template_fail_before_any_work(data_args, tiny_tokenizer):
    with pytest.raises(TunelabError, match="unknown data stage 'predict'"):
        build_dataset(data_args, tiny_tokenizer, "predict")
    with pytest.raises(TunelabError, match="unknown template"):
        build_dataset(dataclasses.replace(data_args, template="glm"), tiny_tokenizer, "train")
