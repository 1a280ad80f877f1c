"""Helpers for the study tests (no tests here; named test_* to sit with them): a fake `run_fn` that writes
the files a real train / predict stage writes (so the runner and the report run without a model), and
small study specs and dirs.

Module-level functions and classes only, so worker processes (spawn) can unpickle them.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from tunelab.study.runner import write_plan
from tunelab.study.spec import expand, parse_spec

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_train_files(out: Path, finetuning_type: str = "lora", trainable: int = 1000, losses=(2.0, 1.8, 1.5, 1.4),
                      runtime: float = 12.5) -> dict[str, Any]:
    history = [{"loss": loss, "learning_rate": 1e-4, "epoch": (i + 1) / len(losses), "step": i + 1}
               for i, loss in enumerate(losses)]
    history.append({"train_runtime": runtime, "step": len(losses)})
    metrics = {"epoch": 1.0, "train_loss": sum(losses) / len(losses), "train_runtime": runtime,
               "train_samples_per_second": 3.0, "train_steps_per_second": 0.4}
    _write(out / "trainable.json", {"finetuning_type": finetuning_type, "trainable_params": trainable,
                                    "all_params": 100_000, "trainable_percent": trainable / 1000,
                                    "modules": [], "layers": []})
    _write(out / "trainer_state.json", {"log_history": history})
    _write(out / "train_results.json", metrics)
    return metrics


def write_predict_files(out: Path, scores: dict[str, float], pairs=(("a", "b"),), nll=None, kl=None) -> dict[str, Any]:
    """predict_results.json with `scores`, and generated_predictions.jsonl of (predict, label) pairs;
    with `nll` (and `kl`), per-sample lists, likelihood.jsonl in the contract's format too."""
    results = {f"predict_{m}": scores[m] for m in METRICS}
    results.update(predict_loss=1.0, predict_perplexity=2.7, predict_samples=len(pairs), predict_runtime=1.0)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"index": i, "prompt": "q", "predict": p, "label": label})
             for i, (p, label) in enumerate(pairs)]
    (out / "generated_predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if nll is not None:
        kl = kl if kl is not None else [None] * len(nll)
        lines = [json.dumps({"index": i, "tokens": 5, "nll": n, "kl": k}) for i, (n, k) in enumerate(zip(nll, kl))]
        (out / "likelihood.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        results.update(predict_nll=sum(nll) / len(nll), predict_likelihood_samples=len(nll),
                       predict_generated_samples=len(pairs))
    _write(out / "predict_results.json", results)
    return results


def _log_call(out: Path, args) -> None:
    study_dir = out.parents[2]  # <study>/rows/<row>/<stage>
    entry = {"stage": str(out.relative_to(study_dir)), "resume": args.training.resume_from_checkpoint,
             "checkpoint_dir": args.model.checkpoint_dir, "finetuning_type": args.finetune.finetuning_type}
    with (study_dir / "calls.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def fake_run(args) -> dict[str, Any]:
    """Stands in for tunelab.train.run: logs the call, writes a stage's result files."""
    out = Path(args.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log_call(out, args)
    if args.training.do_train:
        return write_train_files(out, args.finetune.finetuning_type)
    base = zlib.crc32(str(out.relative_to(out.parents[2])).encode()) % 1000 / 100  # deterministic per stage
    tuned = args.finetune.finetuning_type != "none"
    return write_predict_files(out, {m: base + i for i, m in enumerate(METRICS)},
                               nll=[2.0 + base / 10, 2.5 - base / 10], kl=[base / 10 if tuned else 0.0] * 2)


class FailingRun:
    """fake_run, except stages whose output dir contains `match` raise `exc`."""

    def __init__(self, match: str, exc: type[BaseException] = ValueError):
        self.match, self.exc = match, exc

    def __call__(self, args) -> dict[str, Any]:
        if self.match in str(args.training.output_dir):
            raise self.exc(f"boom in {self.match}")
        return fake_run(args)


class JointRun:
    """fake_run with `evals`: a row's eval stages in one call (as tunelab.train.run_evals), logged as one
    "evals" line naming the stages; each stage reports predict_runtime `runtimes[i]`."""

    def __init__(self, runtimes=(1.0, 3.0), match: str | None = None):
        self.runtimes, self.match = runtimes, match

    def __call__(self, args) -> dict[str, Any]:
        return fake_run(args)

    def evals(self, args_list) -> list[dict[str, Any]]:
        outs = [Path(a.training.output_dir) for a in args_list]
        study_dir = outs[0].parents[2]
        with (study_dir / "calls.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": "evals", "stages": [str(o.relative_to(study_dir)) for o in outs]}) + "\n")
        if self.match and any(self.match in str(o) for o in outs):
            raise KeyboardInterrupt(f"stopped in {self.match}")
        results = []
        for args, runtime in zip(args_list, self.runtimes):
            out = Path(args.training.output_dir)
            results.append(write_predict_files(out, {m: 1.0 for m in METRICS}, nll=[2.0, 2.5]))
            results[-1]["predict_runtime"] = runtime
        return results


def read_calls(study_dir: Path) -> list[dict[str, Any]]:
    path = Path(study_dir) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tiny_spec_dict(**over: Any) -> dict[str, Any]:
    """A 3-row spec (LoRA, Freeze with aux, P-Tuning) like examples/study_tiny.yaml."""
    spec = {
        "name": "tiny",
        "shared": {"dataset_dir": "data", "max_source_length": 64},
        "train": {"dataset": "example", "max_samples": 4, "num_train_epochs": 1, "learning_rate": 1e-3},
        "eval": {"max_new_tokens": 4},
        "eval_sets": {"persona": {"dataset": "example", "max_samples": 2},
                      "general": {"dataset": "alpaca_gpt4_en", "max_samples": 2}},
        "aux_dataset": "identity",
        "rows": [
            {"id": 1, "name": "lora_qkv", "method": "lora", "weights": "qkv", "layers": "last1",
             "options": {"lora_target": "qkv", "target_layers": "last:1"}},
            {"id": 2, "name": "freeze_mlp_aux", "method": "freeze", "weights": "mlp", "layers": "last1", "aux": True,
             "options": {"num_layer_trainable": 1}},
            {"id": 3, "name": "p_tuning", "method": "p_tuning", "weights": "prefix", "layers": "all",
             "options": {"pre_seq_len": 4}},
        ],
    }
    spec.update(over)
    return spec


def tiny_plans(study_dir: Path, **over: Any):
    """(spec, plans) of tiny_spec_dict in study_dir, with plan.json written as the CLI does."""
    spec = parse_spec(tiny_spec_dict(**over))
    plans = expand(spec, None, study_dir)
    write_plan(study_dir, plans, {"name": spec.name, "scale": None,
                                  "eval_sets": {n: c["role"] for n, c in spec.eval_sets.items()}}, None)
    return spec, plans
