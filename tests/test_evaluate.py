"""eval / predict end to end on tiny models: result keys, the predictions file, checkpoints of each
method scored without method flags, and retention with a cached base pass."""

import json

import pytest

from tunelab import retention
from tunelab.cli import main
from tunelab.hparams import parse_args
from tunelab.methods import method_names
from tunelab.train import run

TRAIN = {  # a few flags per method (the rest run with their defaults)
    "lora": ["--lora_target", "qkv"], "freeze": ["--num_layer_trainable", "1"], "p_tuning": ["--pre_seq_len", "4"]}


def _train(model_dir, data_dir, out, method):
    run(parse_args(["--do_train", "--model_name_or_path", str(model_dir), "--dataset", "tiny", "--dataset_dir",
                    str(data_dir), "--finetuning_type", method, "--output_dir", str(out), "--max_steps", "2",
                    "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--bf16", "false",
                    "--source_prefix", "You are Yui.", *TRAIN.get(method, [])]))
    return out


def _predict_argv(data_dir, out, *extra):
    return ["--do_predict", "--predict_with_generate", "--dataset", "tiny", "--dataset_dir", str(data_dir),
            "--output_dir", str(out), "--max_samples", "5", "--per_device_eval_batch_size", "2",
            "--max_new_tokens", "6", "--bf16", "false", *extra]


@pytest.mark.parametrize("method", method_names(lambda m: m.trains and not m.whole_model))
def test_predict_a_trained_checkpoint_needs_no_method_flags(tiny_llama_dir, tiny_data_dir, tmp_path, method):
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", method)
    out = tmp_path / "pred"
    results = run(parse_args(_predict_argv(tiny_data_dir, out, "--checkpoint_dir", str(ckpt))))
    keys = {f"predict_{k}" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "loss", "perplexity", "samples")}
    assert keys <= set(results)
    assert json.loads((out / "predict_results.json").read_text()) == results
    assert keys <= set(json.loads((out / "all_results.json").read_text()))
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
    assert rows[0]["label"] == "Hello 0! I am fine, thank you."
    assert "You are Yui." in rows[0]["prompt"]  # the run's source_prefix came from the checkpoint
    assert "你好" in lines[0]                       # UTF-8, not ASCII-escaped


def test_eval_of_the_base_model_and_short_form(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny", "--dataset_dir",
            str(tiny_data_dir), "--output_dir", str(out), "--max_samples", "3", "--max_new_tokens", "4",
            "--bf16", "false"]
    assert main(argv) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_bleu-4", "eval_rouge-l", "eval_loss", "eval_perplexity"} <= set(results)
    assert not (out / "generated_predictions.jsonl").exists()  # eval scores; predict also keeps the answers
    decoding = json.loads((out / "decoding.json").read_text())
    assert decoding["do_sample"] is False  # greedy by default, recorded with the results


def test_retention_reuses_one_base_pass(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch):
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", "lora")
    calls = []
    import tunelab.evaluate as ev

    original_score = ev.score

    def counting_score(model, *a, **k):
        calls.append(type(model).__name__)
        return original_score(model, *a, **k)

    monkeypatch.setattr(ev, "score", counting_score)
    for name in ("a", "b"):
        out = tmp_path / name
        run(parse_args(_predict_argv(tiny_data_dir, out, "--checkpoint_dir", str(ckpt), "--compare_base")))
        table = json.loads((out / "retention.json").read_text())
        assert set(table) == {"base", "tuned", "delta"}
        for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "loss"):
            assert table["delta"][key] == pytest.approx(table["tuned"][key] - table["base"][key], abs=1e-3)
    assert len(calls) == 3, calls  # tuned, base, tuned: the second run read the base scores from the cache


def test_retention_table_is_pure():
    table = retention.retention_table({"bleu-4": 10.0, "loss": 2.0}, {"bleu-4": 12.5, "loss": 1.5, "extra": 1})
    assert table == {"base": {"bleu-4": 10.0, "loss": 2.0}, "tuned": {"bleu-4": 12.5, "loss": 1.5},
                     "delta": {"bleu-4": 2.5, "loss": -0.5}}
