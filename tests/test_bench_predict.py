"""bench.predict's pure parts: the prompts both sides read, each side's command and config, reading their
result files, the medians and ratio, and the path without LLaMA-Factory. None of it needs LLaMA-Factory."""

import json
import os
import stat
import sys

import pytest
import yaml

from bench import predict
from tunelab.data import load_examples
from tunelab.hparams import parse_args

CFG = {"samples": 3, "max_new_tokens": 16, "batch": 4, "cutoff": 200, "precision": "fp32", "model": "/m",
       "cpu": True}


def test_write_prompts_is_the_first_rows_and_tunelab_reads_it(tmp_path):
    folder = predict.write_prompts(3, tmp_path)
    source = json.loads((predict.REPO / "data" / "alpaca_gpt4_en" / "alpaca_en_demo.json").read_text("utf-8"))
    assert json.loads((folder / f"{predict.DATASET}.json").read_text("utf-8")) == source[:3]
    args = parse_args(["--do_predict", "--output_dir", str(tmp_path / "o"), "--dataset", predict.DATASET,
                       "--dataset_dir", str(folder)])
    examples, _ = load_examples(args.data)
    assert [(e.prompt, e.query, e.response) for e in examples] == [
        (r["instruction"], r["input"], r["output"]) for r in source[:3]]


def test_write_prompts_refuses_more_rows_than_the_data_has(tmp_path):
    with pytest.raises(SystemExit, match="rows"):
        predict.write_prompts(10**6, tmp_path)


@pytest.mark.parametrize("precision, bf16", [("fp32", False), ("bf16", True)])
def test_tunelab_command_is_valid_tunelab_predict(tmp_path, precision, bf16):
    cmd = predict.tunelab_command({**CFG, "precision": precision}, tmp_path / "data", tmp_path / "out")
    assert cmd[:4] == [sys.executable, "-m", "tunelab", "predict"]
    args = parse_args(["--do_predict", *cmd[4:]])  # every flag is one tunelab knows
    assert args.generation.max_new_tokens == 16 and not args.generation.do_sample
    assert args.training.per_device_eval_batch_size == 4
    assert args.data.max_source_length == 100 and args.data.max_target_length == 100
    assert args.data.dataset == predict.DATASET and args.data.template == "auto"
    assert args.model.model_name_or_path == "/m" and args.training.bf16 is bf16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_llamafactory_config_matches_the_tunelab_side(tmp_path, precision):
    config = predict.llamafactory_config({**CFG, "precision": precision}, tmp_path / "data", tmp_path / "out")
    assert config["stage"] == "sft" and config["do_predict"] and config["predict_with_generate"]
    assert config["eval_dataset"] == predict.DATASET and config["dataset_dir"] == str(tmp_path / "data")
    assert (config["cutoff_len"], config["max_new_tokens"], config["per_device_eval_batch_size"]) == (200, 16, 4)
    assert config["do_sample"] is False and config["bf16"] is (precision == "bf16")
    assert config["infer_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    assert config["use_cpu"] is True and config["model_name_or_path"] == "/m"
    assert "template" not in config  # LLaMA-Factory parses the tokenizer's chat template


def test_llamafactory_command_prefers_the_envs_cli(tmp_path):
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.touch()
    assert predict.llamafactory_command(str(python), tmp_path / "c.yaml") == [
        str(python), "-m", "llamafactory.cli", "train", str(tmp_path / "c.yaml")]
    (python.parent / "llamafactory-cli").touch()
    assert predict.llamafactory_command(str(python), tmp_path / "c.yaml") == [
        str(python.parent / "llamafactory-cli"), "train", str(tmp_path / "c.yaml")]


def _script(path, body):
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_find_llamafactory_asks_the_envs_python(tmp_path):
    installed = _script(tmp_path / "py_with", "echo 0.9.5")
    missing = _script(tmp_path / "py_without", "echo 'No module' >&2; exit 1")
    assert predict.find_llamafactory(installed) == (installed, "0.9.5")
    assert predict.find_llamafactory(missing) is None
    assert predict.find_llamafactory(str(tmp_path / "nowhere" / "python")) is None


def test_find_llamafactory_without_a_python_looks_at_env_then_path(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAFACTORY_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert predict.find_llamafactory(None) is None  # nothing installed: tunelab runs alone
    _script(tmp_path / "llamafactory-cli", "exit 0")
    python = _script(tmp_path / "python", "echo 0.9.5")
    assert predict.find_llamafactory(None) == (python, "0.9.5")
    other = _script(tmp_path / "other_python", "echo 0.9.4")
    monkeypatch.setenv("LLAMAFACTORY_PYTHON", other)
    assert predict.find_llamafactory(None) == (other, "0.9.4")


def _write_outputs(out, results, answers):
    out.mkdir(parents=True)
    (out / "predict_results.json").write_text(json.dumps(results))
    (out / "generated_predictions.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "predict": a, "label": "l"}) + "\n" for a in answers))


def test_parse_results_of_each_side(tmp_path):
    _write_outputs(tmp_path / "t", {"predict_runtime": 12.5, "predict_scoring_runtime": 0.5,
                                    "predict_generation_runtime": 8.0, "predict_tokens_generated": 40,
                                    "predict_base_pass_runtime": 3.5}, ["a", "b"])
    _write_outputs(tmp_path / "l", {"predict_runtime": 9.25, "predict_samples_per_second": 0.2}, ["a", "c"])
    assert predict.parse_results("tunelab", tmp_path / "t") == {
        "model_s": 16.0, "answers": ["a", "b"], "loss_pass_s": 4.0, "generation_s": 8.0, "new_tokens": 40}
    assert predict.parse_results("llamafactory", tmp_path / "l") == {"model_s": 9.25, "answers": ["a", "c"]}
    assert predict.parse_results("llamafactory", tmp_path / "missing") == {"model_s": None, "answers": []}


def test_run_side_times_the_process_and_flags_missing_answers(tmp_path):
    out = tmp_path / "t"
    _write_outputs(out, {"predict_runtime": 1.0}, ["x", "y"])
    ok = predict.run_side("tunelab", [sys.executable, "-c", "print('hi')"], dict(os.environ), out, samples=2)
    assert ok["rc"] == 0 and ok["wall_s"] > 0 and ok["answers"] == ["x", "y"] and "error" not in ok
    assert (tmp_path / "t.log").read_text() == "hi\n"
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    busy = predict.run_side("tunelab", [sys.executable, "-c", spin], dict(os.environ), out, 2)
    assert busy["cpu_s"] >= 0.3  # the child's own CPU time, whatever else the machine runs
    short = predict.run_side("tunelab", [sys.executable, "-c", "print('oops')"], dict(os.environ), out, samples=3)
    assert short["error"].startswith("exit 0, 2/3 answers") and "oops" in short["log_tail"]
    failed = predict.run_side("tunelab", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), out, 2)
    assert failed["error"].startswith("exit 3")


def _run(side, wall, model, answers=("a",), **extra):
    return {"side": side, "wall_s": wall, "model_s": model, "samples": 10, "answers": list(answers), **extra}


def test_summarize_takes_medians_of_successful_runs_and_the_ratio():
    results = [_run("tunelab", 10.0, 6.0, loss_pass_s=2.0, cpu_s=15.0), _run("llamafactory", 30.0, 20.0),
               _run("tunelab", 20.0, 8.0, loss_pass_s=3.0, cpu_s=35.0), _run("llamafactory", 50.0, 25.0),
               _run("tunelab", 90.0, 9.0, error="exit 1")]
    table = predict.summarize(results)
    assert table["tunelab"]["runs"] == 2 and table["tunelab"]["wall_s"] == 15.0
    assert table["tunelab"]["model_s"] == 7.0 and table["tunelab"]["loss_pass_s"] == 2.5
    assert table["tunelab"]["cpu_s"] == 25.0 and table["llamafactory"]["cpu_s"] is None
    assert table["tunelab"]["samples_per_s"] == 10 / 15.0
    assert table["llamafactory"]["model_samples_per_s"] == 10 / 22.5
    assert table["tunelab"]["generation_s"] is None
    assert predict.ratio(table) == pytest.approx(40.0 / 15.0)  # LF's median wall over tunelab's
    assert predict.ratio(table, "model_samples_per_s") == pytest.approx(22.5 / 7.0)


def test_without_llamafactory_only_tunelab_runs_and_no_ratio_is_printed(tmp_path):
    runs = list(predict.side_runs(CFG, None, tmp_path / "data", tmp_path, repeats=2))
    assert [r[0] for r in runs] == ["tunelab", "tunelab"] and not list(tmp_path.glob("*.yaml"))
    table = predict.summarize([_run("tunelab", 10.0, None)])
    assert predict.ratio(table) is None and predict.same_answers([_run("tunelab", 10.0, None)]) is None
    info = {"date": "d", "cpu": "c", "cpu_class": "AVX2", "cores": 2, "torch": "t"}
    text = predict.format_table(table, info, CFG)
    assert "AVX2" in text and "tunelab" in text and "LLaMA-Factory samples/s" not in text


def test_with_llamafactory_the_sides_alternate_and_its_config_is_written(tmp_path):
    lf = (str(tmp_path / "python"), "0.9.5")
    runs = list(predict.side_runs(CFG, lf, tmp_path / "data", tmp_path, repeats=2))
    assert [r[0] for r in runs] == ["tunelab", "llamafactory"] * 2
    _, cmd, env, out = runs[1]
    assert cmd == predict.llamafactory_command(lf[0], tmp_path / "llamafactory-0.yaml")
    assert "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    caches = [r[2]["TUNELAB_CACHE"] for r in runs if r[0] == "tunelab"]  # each tunelab run starts cold
    assert len(set(caches)) == 2 and all(c.startswith(str(tmp_path)) for c in caches)
    assert yaml.safe_load((tmp_path / "llamafactory-0.yaml").read_text()) == predict.llamafactory_config(
        CFG, tmp_path / "data", out)
    results = [_run("tunelab", 10.0, 5.0, answers=["a", "b "]), _run("llamafactory", 20.0, 9.0, answers=["a", "c"])]
    assert predict.same_answers(results) == (1, 2)
    text = predict.format_table(predict.summarize(results), {"date": "d", "cpu": "c", "cpu_class": "AVX-512 BF16",
                                                             "cores": 2, "torch": "t"}, CFG)
    assert "2.00x end to end" in text and "1.80x model only" in text
