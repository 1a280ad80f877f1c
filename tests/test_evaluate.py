"""eval / predict end to end on tiny models: result keys, the predictions file, checkpoints of each
method scored without method flags, and retention with a cached base pass."""

import json
import math

import pytest
import torch

from tunelab import retention
from tunelab.cli import main
from tunelab.evaluate import generation_subset
from tunelab.hparams import TunelabError, parse_args
from tunelab.methods import method_names
from tunelab.train import run

TRAIN = {"lora": ["--lora_target", "qkv"], "freeze": ["--num_layer_trainable", "1"], "p_tuning": ["--pre_seq_len", "4"],
         "full": []}


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
    keys = {f"predict_{k}" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "loss", "perplexity", "samples",
                                     "nll", "kl", "kl_topk_mass", "likelihood_samples", "generated_samples",
                                     "base_pass_runtime")}
    assert keys <= set(results)
    assert json.loads((out / "predict_results.json").read_text()) == results
    assert keys <= set(json.loads((out / "all_results.json").read_text()))
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"index", "prompt", "predict", "label"} for r in rows)
    assert [r["index"] for r in rows] == list(range(5))
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


def test_retention_reuses_one_base_pass(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", "lora")
    calls = []
    import tunelab.evaluate as ev

    original_score = ev.score_likelihood  # every scoring of a model, the tuned one's and retention's of the base

    def counting_score(model, *a, **k):
        calls.append(type(model).__name__)
        return original_score(model, *a, **k)

    monkeypatch.setattr(ev, "score_likelihood", counting_score)
    for name in ("a", "b"):
        out = tmp_path / name
        run(parse_args(_predict_argv(tiny_data_dir, out, "--checkpoint_dir", str(ckpt), "--compare_base")))
        table = json.loads((out / "retention.json").read_text())
        assert set(table) == {"base", "tuned", "delta", "noise"}
        assert table["base"]["kl"] == 0.0 and table["tuned"]["kl"] > 0
        for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "loss", "nll", "kl"):
            assert table["delta"][key] == pytest.approx(table["tuned"][key] - table["base"][key], abs=1e-3)
        assert table["noise"]["nll"] > 0 and table["noise"]["kl"] > 0 and table["noise"]["perplexity"] > 0
        printed = capsys.readouterr().out.split("tuned vs base", 1)[1].splitlines()
        assert printed[1].split() == ["base", "tuned", "delta", "noise"]
        rows = {line.split()[0]: line.split()[1:] for line in printed[2:]}
        assert set(rows) == set(table["base"])  # every score and likelihood measure, on screen
        for key, (base, tuned, delta, noise) in rows.items():
            assert float(base) == pytest.approx(table["base"][key], abs=1e-4)
            assert float(delta) == pytest.approx(table["delta"][key], abs=1e-4)
            assert noise == "-" or float(noise.rstrip("*")) == pytest.approx(table["noise"][key], abs=1e-4)
    assert len(calls) == 3, calls  # tuned, base, tuned: the second run read the base scores from the cache


def test_paired_standard_errors_by_hand():
    assert retention.mean_se([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2), n 2
    assert retention.mean_se([2.0]) is None
    # equal weights: the same as the plain mean's, up to the ratio estimator's m / (m - 1)
    assert retention.weighted_se([1.0, 3.0], [5, 5]) == pytest.approx(1.0)
    assert retention.weighted_se([1.0, 3.0], [1, 3]) == pytest.approx(math.sqrt(2 * ((1 * (1 - 2.5))**2 + (3 * (3 - 2.5))**2)) / 4)  # D = 2.5
    noise = retention.paired_noise(
        {0: {"bleu-4": 10.0, "rouge-1": 1, "rouge-2": 1, "rouge-l": 1}, 1: {"bleu-4": 20.0, "rouge-1": 1,
                                                                          "rouge-2": 1, "rouge-l": 1}},
        {0: {"bleu-4": 11.0, "rouge-1": 1, "rouge-2": 1, "rouge-l": 1}, 1: {"bleu-4": 23.0, "rouge-1": 1,
                                                                          "rouge-2": 1, "rouge-l": 1}},
        [{"index": 0, "tokens": 5, "nll": 2.0}, {"index": 1, "tokens": 5, "nll": 2.0}],
        [{"index": 0, "tokens": 5, "nll": 1.0, "kl": 0.1}, {"index": 1, "tokens": 5, "nll": 3.0, "kl": 0.3}])
    assert noise["bleu-4"] == 1.0 and noise["rouge-1"] == 0.0
    assert noise["nll"] == noise["loss"] == 1.0 and noise["kl"] == 0.1
    assert noise["perplexity"] == pytest.approx(math.exp(2.0), abs=1e-4)


def test_format_retention_marks_deltas_beyond_twice_the_noise():
    table = retention.retention_table({"bleu-4": 10.0, "nll": 2.0}, {"bleu-4": 12.5, "nll": 1.9},
                                      {"bleu-4": 1.0, "nll": None})
    lines = retention.format_retention(table, 48).splitlines()
    assert "48 samples" in lines[0]
    assert lines[2].split() == ["bleu-4", "10.0000", "12.5000", "+2.5000", "1.0000*"]
    assert lines[3].split() == ["nll", "2.0000", "1.9000", "-0.1000", "-"]


def test_retention_table_is_pure():
    table = retention.retention_table({"bleu-4": 10.0, "loss": 2.0}, {"bleu-4": 12.5, "loss": 1.5, "extra": 1})
    assert table == {"base": {"bleu-4": 10.0, "loss": 2.0}, "tuned": {"bleu-4": 12.5, "loss": 1.5},
                     "delta": {"bleu-4": 2.5, "loss": -0.5}}


# ---- per-sample likelihood (likelihood.jsonl) and the generation subset ----

def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_writes_likelihood_per_sample_and_its_aggregates(tiny_llama_dir, tiny_data_dir, tmp_path):
    """A tuned checkpoint: likelihood.jsonl has one line per sample with kl against the base model (whose
    pass ran first, on the same loaded model); the aggregates are their token-weighted means."""
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", "lora")
    out = tmp_path / "pred"
    results = run(parse_args(_predict_argv(tiny_data_dir, out, "--checkpoint_dir", str(ckpt),
                                           "--max_generate_samples", "2", "--likelihood_topk", "8")))
    lines = _lines(out / "likelihood.jsonl")
    assert [line["index"] for line in lines] == list(range(5))
    assert all(set(line) == {"index", "tokens", "nll", "kl"} for line in lines)
    assert all(line["tokens"] > 0 and line["nll"] > 0 and line["kl"] > 0 for line in lines)
    count = sum(line["tokens"] for line in lines)
    assert results["predict_nll"] == pytest.approx(sum(x["nll"] * x["tokens"] for x in lines) / count, abs=1e-5)
    assert results["predict_kl"] == pytest.approx(sum(x["kl"] * x["tokens"] for x in lines) / count, abs=1e-5)
    assert results["predict_loss"] == results["predict_nll"]
    assert 0 < results["predict_kl_topk_mass"] < 1
    assert results["predict_likelihood_samples"] == 5 and results["predict_generated_samples"] == 2
    preds = _lines(out / "generated_predictions.jsonl")
    assert [p["index"] for p in preds] == [0, 3]  # round(0 * 5/2), round(1 * 5/2) with halves up
    assert preds[1]["label"] == "Hello 3! I am fine, thank you."


def test_the_base_model_has_zero_kl_and_caches_its_pass(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch):
    """The base model's own eval: kl = 0.0 per sample and its pass cached, so a checkpoint's eval on the same
    data reads the base log-probs instead of computing them: one top-k pass in all."""
    import tunelab.evaluate as ev

    passes = []
    original = ev.sample_likelihoods

    def counting(*a, topk=0, **k):
        passes.append(topk)
        return original(*a, topk=topk, **k)

    monkeypatch.setattr(ev, "sample_likelihoods", counting)
    base = run(parse_args(_predict_argv(tiny_data_dir, tmp_path / "base", "--model_name_or_path",
                                        str(tiny_llama_dir), "--source_prefix", "You are Yui.")))
    lines = _lines(tmp_path / "base/likelihood.jsonl")
    assert [line["kl"] for line in lines] == [0.0] * 5 and base["predict_kl"] == 0.0
    assert passes == [512]  # only the base pass (default --likelihood_topk): the base model's nll comes from it
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", "freeze")
    tuned = run(parse_args(_predict_argv(tiny_data_dir, tmp_path / "tuned", "--checkpoint_dir", str(ckpt))))
    assert passes == [512, 0]  # the checkpoint's data (its source_prefix) matched: base log-probs from the cache
    assert tuned["predict_kl"] > 0
    assert tuned["predict_nll"] != base["predict_nll"]


def test_a_none_checkpoint_has_zero_kl(tiny_llama_dir, tiny_data_dir, tmp_path):
    """A `none` checkpoint changes nothing: its computed kl against the base pass is 0, nll the base's."""
    ckpt = tmp_path / "none_ckpt"
    ckpt.mkdir()
    (ckpt / "tunelab_method.json").write_text(json.dumps({"finetuning_type": "none",
                                                          "base_model": str(tiny_llama_dir)}))
    out = tmp_path / "eval"
    results = run(parse_args(_predict_argv(tiny_data_dir, out, "--checkpoint_dir", str(ckpt))))
    assert results["predict_kl"] == pytest.approx(0.0, abs=1e-6)
    base = run(parse_args(_predict_argv(tiny_data_dir, tmp_path / "base", "--model_name_or_path",
                                        str(tiny_llama_dir))))
    assert results["predict_nll"] == pytest.approx(base["predict_nll"], abs=1e-6)


def test_base_likelihood_is_computed_once(tiny_llama_dir, tiny_data_dir, tmp_path):
    from tunelab.evaluate import sample_likelihoods
    from tunelab.model import load_model_and_tokenizer
    from tunelab.preprocess import build_dataset

    args = parse_args(_predict_argv(tiny_data_dir, tmp_path / "x", "--model_name_or_path", str(tiny_llama_dir),
                                    "--likelihood_topk", "4"))
    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    dataset = build_dataset(args.data, tokenizer, "eval")
    calls = []

    def compute_once():
        assert not calls, "the base pass ran twice"
        calls.append(1)
        return sample_likelihoods(model.eval(), dataset, tokenizer, args, topk=4)[1]

    first = retention.base_likelihood(args, str(tiny_llama_dir), dataset, compute_once)
    again = retention.base_likelihood(args, str(tiny_llama_dir), dataset, compute_once)
    assert calls == [1] and first.k == again.k == 4
    assert torch.equal(first.ids, again.ids) and torch.equal(first.logprobs, again.logprobs)


@pytest.mark.parametrize("n, limit, expected", [(5, 2, [0, 3]), (10, 3, [0, 3, 7]), (4, 4, [0, 1, 2, 3]),
                                                (3, 9, [0, 1, 2]), (7, None, list(range(7))), (100, 1, [0])])
def test_generation_subset_is_evenly_spaced(n, limit, expected):
    assert generation_subset(n, limit) == expected


def test_generation_subset_is_strictly_increasing():
    for n in range(1, 40):
        for limit in range(1, n + 1):
            chosen = generation_subset(n, limit)
            assert len(chosen) == limit and chosen == sorted(set(chosen)) and chosen[-1] < n


@pytest.mark.parametrize("flag", ["--max_generate_samples", "--likelihood_topk"])
def test_eval_counts_must_be_positive(flag):
    with pytest.raises(TunelabError, match=f"{flag} must be an integer >= 1"):
        parse_args(["--do_eval", "--output_dir", "x", flag, "0"])


def test_a_full_checkpoint_drifts_from_its_recorded_base(tiny_llama_dir, tiny_data_dir, tmp_path):
    """A full checkpoint is loaded as the model itself: the base pass must load the base it was trained from
    (kl > 0), not score the checkpoint against itself."""
    ckpt = _train(tiny_llama_dir, tiny_data_dir, tmp_path / "train", "full")
    results = run(parse_args(_predict_argv(tiny_data_dir, tmp_path / "eval", "--checkpoint_dir", str(ckpt))))
    assert results["predict_kl"] > 1e-4


@pytest.mark.parametrize("method", [None, "lora"])
def test_predict_shares_the_prompts_forward_with_the_likelihood_pass(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                     monkeypatch, method):
    """Predictions and scores are those of predict without sharing (fp32); with sharing, generation ran no
    prompt forward of its own (every prompt's keys/values came from the likelihood or base pass)."""
    from tunelab import evaluate, prefill

    extra = ["--checkpoint_dir", str(_train(tiny_llama_dir, tiny_data_dir, tmp_path / "t", method))] if method else []
    argv = [*_predict_argv(tiny_data_dir, tmp_path / "a", *extra), "--model_name_or_path", str(tiny_llama_dir)]
    stacked = []
    real = prefill.stacked_cache
    monkeypatch.setattr(prefill, "stacked_cache",
                        lambda m, pieces, w: stacked.append(len(pieces)) or real(m, pieces, w))
    shared = run(parse_args(argv))
    assert sum(stacked) == 5  # all five prompts decoded on from the pass's keys/values
    monkeypatch.setattr(evaluate, "shared_prompts", lambda *a: None)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "fresh_cache"))  # the base pass runs again too
    argv[argv.index(str(tmp_path / "a"))] = str(tmp_path / "b")
    alone = run(parse_args(argv))
    for key in ("predict_nll", "predict_kl", "predict_bleu-4", "predict_rouge-l"):
        assert shared[key] == pytest.approx(alone[key], abs=1e-5), key
    assert (tmp_path / "a" / "generated_predictions.jsonl").read_text() == \
        (tmp_path / "b" / "generated_predictions.jsonl").read_text()
    assert shared["predict_generation_prompt_tokens"] == 5  # each prompt's last token only
    assert alone["predict_generation_prompt_tokens"] > 5 * 10  # every prompt token


@pytest.mark.parametrize("method", [None, "lora"])
def test_a_rows_eval_sets_share_one_model_load_and_one_generation(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                 monkeypatch, method):
    """run_evals of two sets that differ in data only: one model load, one generate_batched call over both sets'
    subsets, and per set the scores, predictions and token counts of a run of that set alone (fp32)."""
    from tunelab import evaluate, generation
    from tunelab.train import run_evals

    extra = ["--checkpoint_dir", str(_train(tiny_llama_dir, tiny_data_dir, tmp_path / "t", method))] if method else []

    def argv(out, *more):
        return [*_predict_argv(tiny_data_dir, tmp_path / out, *extra, *more), "--model_name_or_path",
                str(tiny_llama_dir)]

    sets = [argv("a", "--max_generate_samples", "3"), argv("b", "--max_samples", "4", "--source_prefix", "Be brief.")]
    alone = [run(parse_args(a)) for a in sets]
    calls = {"setup_base": 0, "generate": []}
    real_setup, real_generate = evaluate.setup_base, generation.generate_batched

    def count_setup(*a, **k):
        calls["setup_base"] += 1
        return real_setup(*a, **k)

    def count_generate(model, tokenizer, prompts, *a, **k):
        calls["generate"].append(len(prompts))
        return real_generate(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(evaluate, "setup_base", count_setup)
    monkeypatch.setattr(generation, "generate_batched", count_generate)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "fresh_cache"))  # the base passes run again, as alone
    joint_argv = [[x if x not in (str(tmp_path / "a"), str(tmp_path / "b")) else x + "_joint" for x in a]
                  for a in sets]
    joint = run_evals([parse_args(a) for a in joint_argv])
    assert calls == {"setup_base": 1, "generate": [3 + 4]}
    for name, one, both in zip("ab", alone, joint):
        for key in ("predict_nll", "predict_kl", "predict_bleu-4", "predict_rouge-l", "predict_generated_samples",
                    "predict_tokens_generated", "predict_generation_prompt_tokens", "predict_tokens_scored"):
            assert both[key] == pytest.approx(one[key], abs=1e-5), (name, key)
        assert both["predict_generation_joint_sets"] == 2 and "predict_generation_joint_sets" not in one
        assert (tmp_path / name / "generated_predictions.jsonl").read_text() == \
            (tmp_path / f"{name}_joint" / "generated_predictions.jsonl").read_text()
        assert json.loads((tmp_path / f"{name}_joint" / "predict_results.json").read_text()) == both
        assert json.loads((tmp_path / f"{name}_joint" / "run_status.json").read_text())["status"] == "done"
    # the joint generation's time is shared by answers: 3 of 7, 4 of 7
    assert joint[0]["predict_generation_runtime"] == pytest.approx(
        joint[0]["predict_generation_joint_runtime"] * 3 / 7, abs=2e-3)


def test_eval_sets_with_other_generation_options_run_one_after_another(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch):
    from tunelab import evaluate, generation
    from tunelab.train import run_evals

    base = ["--model_name_or_path", str(tiny_llama_dir)]
    sets = [parse_args([*_predict_argv(tiny_data_dir, tmp_path / "a"), *base]),
            parse_args([*_predict_argv(tiny_data_dir, tmp_path / "b", "--max_new_tokens", "3"), *base])]
    assert not evaluate.joinable(sets) and evaluate.joinable([sets[0], sets[0]])
    calls = []
    real = generation.generate_batched
    monkeypatch.setattr(generation, "generate_batched", lambda m, t, p, *a, **k: calls.append(len(p)) or real(m, t, p, *a, **k))
    results = run_evals(sets)
    assert calls == [5, 5] and all("predict_generation_joint_sets" not in r for r in results)
