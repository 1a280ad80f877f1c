"""`tunelab predict` side by side with LLaMA-Factory's `predict_with_generate`, in one run.

    python -m bench.predict --llamafactory-python /work/lf_venv/bin/python          # 100 prompts, <= 64 new tokens
    python -m bench.predict --llamafactory-python ... --emulate avx2 --repeats 2    # the AVX2 class, fp32
    python -m bench.predict --quick                                                  # 4 prompts, 8 new tokens

Both sides answer the same first N alpaca_gpt4_en prompts (a copy of the rows and a dataset_info.json
that both tools read, in <out>/predict-data/) with the same converted weights (tunelab's cached
safetensors copy of the default model, `tunelab.model.resolve_model_path`), the model's own chat
template (tunelab `--template auto`; LLaMA-Factory parses it from the tokenizer when no template is
named), greedy decoding, the same max_new_tokens, eval batch size and cutoff (tunelab
`--max_source_length`/`--max_target_length` = cutoff/2 each; LLaMA-Factory `cutoff_len` = cutoff), and the
same precision (`--precision auto`: bf16 where tunelab picks it, i.e. CPUs with fast bf16, else fp32).

Each side is one subprocess as a user runs it: `python -m tunelab predict ...` (the console entry, under
its allocator) and `llamafactory-cli train <config.yaml>` with `stage: sft, do_predict: true,
predict_with_generate: true` in LLaMA-Factory's own virtual env (bench/README.md: how to install it).
Timed end to end, process start to exit (imports and model load included); the model-only time is what
each tool reports in predict_results.json (`parse_results`; tunelab also splits it into its loss pass and
generation). Both start cold: LLaMA-Factory re-tokenizes (`overwrite_cache`), and tunelab gets an empty
$TUNELAB_CACHE per run, so it tokenizes and runs the base model's loss pass as on a first run. Also printed:
each process's CPU seconds (a check on a busy machine). With `--repeats R` the sides alternate R times and
the table prints medians. Without LLaMA-Factory (no --llamafactory-python, $LLAMAFACTORY_PYTHON or
llamafactory-cli on PATH) tunelab runs alone. Raw results: runs/bench/predict-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import DEFAULT_OUT, REPO, machine, median, write_json

DATASET = "bench_alpaca"  # the entry both tools read from <out>/predict-data/dataset_info.json
SOURCE = "alpaca_gpt4_en"  # the repo data set the prompts come from
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
LF_ENV = {"DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true", "LLAMAFACTORY_VERBOSITY": "WARN"}


# ---------------------------------------------------------------- what both sides run

def write_prompts(n: int, out: Path, data_dir: Path = REPO / "data") -> Path:
    """The first n rows of alpaca_gpt4_en and a dataset_info.json naming them DATASET, in a folder that both
    tunelab's and LLaMA-Factory's `dataset_dir` accept (both read alpaca columns under the same keys)."""
    entry = json.loads((data_dir / "dataset_info.json").read_text(encoding="utf-8"))[SOURCE]
    rows = json.loads((data_dir / entry["file_name"]).read_text(encoding="utf-8"))
    if len(rows) < n:
        raise SystemExit(f"{SOURCE} has {len(rows)} rows, {n} asked for")
    folder = out / "predict-data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DATASET}.json").write_text(json.dumps(rows[:n], ensure_ascii=False), encoding="utf-8")
    info = {DATASET: {"file_name": f"{DATASET}.json", "columns": entry["columns"]}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def tunelab_command(cfg: dict[str, Any], data_dir: Path, out_dir: Path) -> list[str]:
    """`tunelab predict` of the base model on DATASET (the console entry, so its allocator applies too)."""
    return [sys.executable, "-m", "tunelab", "predict", "--model_name_or_path", cfg["model"],
            "--dataset", DATASET, "--dataset_dir", str(data_dir), "--template", "auto",
            "--max_source_length", str(cfg["cutoff"] // 2), "--max_target_length", str(cfg["cutoff"] // 2),
            "--max_new_tokens", str(cfg["max_new_tokens"]), "--per_device_eval_batch_size", str(cfg["batch"]),
            "--bf16", "true" if cfg["precision"] == "bf16" else "false", "--output_dir", str(out_dir)]


def llamafactory_config(cfg: dict[str, Any], data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """LLaMA-Factory's predict_with_generate on the same rows and weights: no adapter (it loads the base
    model), no template named (it parses the tokenizer's chat template), greedy, no cache of the data, the
    precision's dtype for the weights (LLaMA-Factory casts them; tunelab keeps fp32 weights under autocast)."""
    return {"model_name_or_path": cfg["model"], "stage": "sft", "do_predict": True, "predict_with_generate": True,
            "finetuning_type": "lora", "eval_dataset": DATASET, "dataset_dir": str(data_dir),
            "cutoff_len": cfg["cutoff"], "overwrite_cache": True,
            "per_device_eval_batch_size": cfg["batch"], "max_new_tokens": cfg["max_new_tokens"],
            "do_sample": False, "bf16": cfg["precision"] == "bf16", "output_dir": str(out_dir),
            # the weights' dtype: bf16 comes from `bf16`; without it LF picks bf16 on a GPU, so say fp32
            "infer_dtype": "bfloat16" if cfg["precision"] == "bf16" else "float32",
            "overwrite_output_dir": True, "report_to": "none", "seed": 0, "dataloader_num_workers": 0,
            "use_cpu": cfg["cpu"]}  # transformers refuses bf16 without a GPU unless told it is on the CPU


def llamafactory_command(python: str, config_path: Path) -> list[str]:
    """The env's `llamafactory-cli train <config>` (next to its python), else the same through `-m`."""
    cli = Path(python).parent / "llamafactory-cli"
    return [str(cli) if cli.is_file() else python, *([] if cli.is_file() else ["-m", "llamafactory.cli"]),
            "train", str(config_path)]


def find_llamafactory(python: str | None) -> tuple[str, str] | None:
    """(python, llamafactory version) of the env to run LLaMA-Factory in, None where it is not installed.
    Without a python given: $LLAMAFACTORY_PYTHON, else the python next to `llamafactory-cli` on PATH."""
    if python is None:
        python = os.environ.get("LLAMAFACTORY_PYTHON")
    if python is None and (cli := shutil.which("llamafactory-cli")):
        python = str(Path(cli).parent / "python")
    if python is None or not Path(python).is_file():
        return None
    probe = [python, "-c", "import importlib.metadata as m; print(m.version('llamafactory'))"]
    done = subprocess.run(probe, check=False, capture_output=True, text=True, timeout=120)
    return (python, done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


# ---------------------------------------------------------------- results

def read_answers(out_dir: Path) -> list[str]:
    """The generated answers in file order: both tools write generated_predictions.jsonl with "predict"."""
    path = out_dir / "generated_predictions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line)["predict"] for line in lines if line.strip()]


def parse_results(side: str, out_dir: Path) -> dict[str, Any]:
    """The model-only times a side reports in predict_results.json (seconds; None where it has none), i.e.
    after the data set is prepared and the model loaded. LLaMA-Factory: model_s = predict_runtime
    (Trainer.predict: generation + BLEU/ROUGE). tunelab: model_s = base_pass_runtime (the base model's loss
    pass, which for a base model is the loss pass) + predict_runtime (the tuned model's loss pass, generation,
    BLEU/ROUGE), split into loss_pass_s and generation_s."""
    path = out_dir / "predict_results.json"
    res = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    parsed = {"model_s": res.get("predict_runtime"), "answers": read_answers(out_dir)}
    if side == "tunelab" and res:
        base = res.get("predict_base_pass_runtime", 0.0)
        parsed.update(model_s=base + res["predict_runtime"],
                      loss_pass_s=base + res.get("predict_scoring_runtime", 0.0),
                      generation_s=res.get("predict_generation_runtime"),
                      new_tokens=res.get("predict_tokens_generated"))
    return parsed


def run_side(side: str, cmd: list[str], env: dict[str, str], out_dir: Path, samples: int,
             timeout: float = 3600) -> dict[str, Any]:
    """Run one side's command, timed from process start to exit; its log goes to <out_dir>.log. cpu_s: the
    CPU seconds (user + system) the process and its waited-for children used, a check on a busy machine."""
    cpu_before, start = _children_cpu(), time.perf_counter()
    with open(f"{out_dir}.log", "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, check=False, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    result = {"side": side, "wall_s": time.perf_counter() - start, "cpu_s": _children_cpu() - cpu_before, "rc": rc,
              "samples": samples, "cmd": cmd, **parse_results(side, out_dir)}
    if rc != 0 or len(result["answers"]) != samples:
        result["error"] = f"exit {rc}, {len(result['answers'])}/{samples} answers; log: {out_dir}.log"
        result["log_tail"] = Path(f"{out_dir}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per side, medians over its successful runs: end-to-end and model-only seconds and samples/s."""
    table: dict[str, dict[str, Any]] = {}
    for side in dict.fromkeys(r["side"] for r in results):
        ok = [r for r in results if r["side"] == side and "error" not in r]
        if not ok:
            table[side] = {"runs": 0}
            continue
        row = {"runs": len(ok), "samples": ok[0]["samples"], "wall_s": median([r["wall_s"] for r in ok])}
        for key in ("cpu_s", "model_s", "loss_pass_s", "generation_s"):
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key] = median(values) if values else None
        row["samples_per_s"] = row["samples"] / row["wall_s"]
        row["model_samples_per_s"] = row["samples"] / row["model_s"] if row["model_s"] else None
        table[side] = row
    return table


def ratio(table: dict[str, dict[str, Any]], key: str = "samples_per_s") -> float | None:
    """tunelab / LLaMA-Factory for `key` (samples/s: > 1 means tunelab is faster); None without both."""
    a, b = table.get("tunelab", {}).get(key), table.get("llamafactory", {}).get(key)
    return a / b if a and b else None


def same_answers(results: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(identical, total) answers of the first successful run of each side; None without both."""
    firsts = {r["side"]: r["answers"] for r in reversed(results) if "error" not in r}
    if len(firsts) < 2:
        return None
    a, b = firsts["tunelab"], firsts["llamafactory"]
    return sum(x.strip() == y.strip() for x, y in zip(a, b)), min(len(a), len(b))


def format_table(table: dict[str, dict[str, Any]], info: dict[str, Any], cfg: dict[str, Any]) -> str:
    def cell(value, fmt):
        return format(value, fmt) if value is not None else "-"

    lines = [(f"{info['date']}  {info['cpu']} ({info['cpu_class']}), {info['cores']} cores, torch {info['torch']}; "
              f"{cfg['samples']} {SOURCE} prompts, greedy, <= {cfg['max_new_tokens']} new tokens, "
              f"batch {cfg['batch']}, cutoff {cfg['cutoff']}, {cfg['precision']}")]
    head = f"{'side':<14}{'runs':>5}{'end-to-end s':>14}{'CPU s':>8}{'samples/s':>11}{'model s':>9}" \
           f"{'model smp/s':>13}{'loss pass s':>13}{'generate s':>12}"
    lines += [head, "-" * len(head)]
    for side, r in table.items():
        if not r["runs"]:
            lines.append(f"{side:<14}{0:>5}  every run failed (see the log above)")
            continue
        lines.append(f"{side:<14}{r['runs']:>5}{r['wall_s']:>14.1f}{cell(r.get('cpu_s'), '.1f'):>8}"
                     f"{r['samples_per_s']:>11.3f}"
                     f"{cell(r['model_s'], '.1f'):>9}{cell(r['model_samples_per_s'], '.3f'):>13}"
                     f"{cell(r.get('loss_pass_s'), '.1f'):>13}{cell(r.get('generation_s'), '.1f'):>12}")
    end_to_end, model = ratio(table), ratio(table, "model_samples_per_s")
    if end_to_end is not None:
        lines.append(f"tunelab / LLaMA-Factory samples/s: {end_to_end:.2f}x end to end, "
                     f"{cell(model, '.2f')}x model only (> 1: tunelab faster)")
    return "\n".join(lines)


# ---------------------------------------------------------------- orchestration

def resolve_precision(choice: str) -> str:
    """"auto": bf16 where tunelab itself picks bf16 (a CUDA GPU or a CPU with fast bf16), else fp32."""
    if choice != "auto":
        return choice
    import torch

    from tunelab.cpu import cpu_has_fast_bf16

    return "bf16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "fp32"


def side_runs(cfg: dict[str, Any], lf: tuple[str, str] | None, data_dir: Path, run_dir: Path, repeats: int):
    """(side, command, env, out_dir) of every run in order: the sides alternate, repeat by repeat."""
    base_env = {**os.environ, **OFFLINE}
    # LLaMA-Factory runs in its own env: the repo must not shadow its packages through PYTHONPATH
    lf_env = {k: v for k, v in base_env.items() if k != "PYTHONPATH"} | LF_ENV
    for rep in range(repeats):
        out = run_dir / f"tunelab-{rep}"
        # a fresh cache: tunelab tokenizes and runs the base model's loss pass as on a first run, as LF
        # (overwrite_cache) does every time; a warm cache would skip that pass on a base model
        env = {**base_env, "TUNELAB_CACHE": str(run_dir / f"tunelab-{rep}-cache")}
        yield "tunelab", tunelab_command(cfg, data_dir, out), env, out
        if lf is not None:
            out = run_dir / f"llamafactory-{rep}"
            config = out.parent / f"llamafactory-{rep}.yaml"  # YAML: 0.9.5 fails to read a .json config
            config.write_text(yaml.safe_dump(llamafactory_config(cfg, data_dir, out), sort_keys=False),
                              encoding="utf-8")
            yield "llamafactory", llamafactory_command(lf[0], config), lf_env, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100, help="first N alpaca_gpt4_en prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="eval batch size of both sides")
    parser.add_argument("--cutoff", type=int, default=256, help="LLaMA-Factory cutoff_len; tunelab: half each side")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; medians")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 prompts, 8 new tokens")
    parser.add_argument("--llamafactory-python", help="python of the env LLaMA-Factory is installed in")
    parser.add_argument("--no-llamafactory", action="store_true", help="run tunelab alone")
    parser.add_argument("--emulate", help="measure as a CPU of this class on a bigger one: avx2 (tunelab/cpu.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.emulate:  # before anything loads torch: the subprocesses inherit these kernel limits
        from tunelab.cpu import emulation_env

        os.environ.update(emulation_env(args.emulate))
    if args.quick:
        args.samples, args.max_new_tokens = min(args.samples, 4), min(args.max_new_tokens, 8)
    import torch

    from tunelab.model import resolve_model_path

    cfg = {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
           "cutoff": args.cutoff, "precision": resolve_precision(args.precision),
           "model": str(resolve_model_path(None)), "cpu": not torch.cuda.is_available()}
    lf = None if args.no_llamafactory else find_llamafactory(args.llamafactory_python)
    print(f"LLaMA-Factory {lf[1]} ({lf[0]})" if lf else
          "LLaMA-Factory is not installed (see bench/README.md; --llamafactory-python): tunelab runs alone")
    info = machine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out / f"predict-{stamp}"
    data_dir = write_prompts(args.samples, run_dir)
    results = []
    for side, cmd, env, out in side_runs(cfg, lf, data_dir, run_dir, args.repeats):
        results.append(run_side(side, cmd, env, out, args.samples))
        r = results[-1]
        print(f"  {side}: " + (f"{r['wall_s']:.1f} s" if "error" not in r else f"{r['error']}\n{r['log_tail']}"),
              flush=True)
    table = summarize(results)
    print("\n" + format_table(table, info, cfg))
    if (same := same_answers(results)) is not None:
        print(f"identical answers: {same[0]}/{same[1]}")
    for r in results[:2 if lf else 1]:
        if r["answers"]:
            print(f"first answer, {r['side']}: {r['answers'][0][:300]!r}")
    write_json(args.out / f"predict-{stamp}.json", {"machine": info, "config": cfg, "llamafactory": lf,
                                                    "summary": table, "results": results, "argv": argv})
    print(f"\nraw results: {args.out / f'predict-{stamp}.json'}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
