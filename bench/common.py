"""What every benchmark shares: the workload rows, the FLOP formula, the step meter, peak RSS, and the
one-line protocol between the orchestrator and its worker subprocesses.

FLOP formula (model FLOPs per optimizer step; MFU = these FLOPs / step time / measured matmul peak):
  for every matmul y = x W (W: in x out; nn.Linear incl. LoRA's A and B, GPT-2's Conv1D, the output projection)
    forward           2 * in * out * rows
    backward, input   2 * in * out * rows   when x requires grad (the gradient has to pass below this matmul)
    backward, weight  2 * in * out * rows   when W is trainable
  rows = real (non-pad) tokens of the batch for the body; for the output projection (in = hidden, out = vocab)
  rows = the positions where logits are actually computed (tunelab: supervised positions only; a plain
  `model(labels=...)` computes every position). Which x require grad is read off the model's own first
  forward (hooks), so "backward through the part of the network that needs gradients" is what autograd
  does: nothing below the lowest trainable layer, no input grad for frozen matmuls on frozen inputs.
  For full fine-tuning of the body this is the familiar 6 * N * tokens; for LoRA on every layer ~4 * N.
  Not counted (so MFU is conservative): attention's T^2 score/value products (~4% of the forward at 256
  tokens on SmolLM2-135M), norms, activations, dropout, the optimizer. (Counting backward as 2x the
  forward *and* adding weight grads would double-count the weight grads of trainable matrices.)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "bench"


# ---------------------------------------------------------------- workload

@dataclass(frozen=True)
class Workload:
    """alpaca_gpt4_en rows formatted with the model's chat template by tunelab's own preprocessing (prompt
    <= 128 tokens, masked with -100), each cut to its first `length` tokens.

    kind "natural": every row, padded per batch to its longest row, as an SFT run with a 256-token cutoff
    sees them (~35% of a batch is padding; tokens/s counts real tokens only). kind "full256": only rows that
    reach `length` tokens: no padding at all, a pure compute benchmark ("batch 8 x 256-token rows")."""

    kind: str = "natural"
    length: int = 256
    dataset: str = "alpaca_gpt4_en"

    def data_flags(self) -> list[str]:
        return ["--dataset", self.dataset, "--dataset_dir", str(REPO / "data"), "--template", "auto",
                "--max_source_length", str(self.length // 2), "--max_target_length", str(self.length * 2)]


def build_rows(workload: Workload, out: Path) -> Path:
    """Tokenize the workload once (tunelab.preprocess, cached) and write its rows as JSON for the workers.
    The rows are shuffled once with a fixed seed, so the first n rows are a fair sample of lengths."""
    import random

    from tunelab.hparams import parse_args
    from tunelab.model import load_tokenizer, resolve_model_path
    from tunelab.preprocess import build_dataset

    tokenizer = load_tokenizer(resolve_model_path(None))
    args = parse_args(["--do_train", "--output_dir", str(out / "unused")] + workload.data_flags())
    rows = [{"input_ids": list(r["input_ids"][:workload.length]), "labels": list(r["labels"][:workload.length])}
            for r in build_dataset(args.data, tokenizer, "train")
            if workload.kind == "natural" or len(r["input_ids"]) >= workload.length]
    random.Random(0).shuffle(rows)
    path = out / f"rows_{workload.dataset}_{workload.kind}_{workload.length}.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def load_rows(path: str | Path, n: int | None = None):
    """The rows as a `datasets.Dataset` (what both trainers get), the first n only when n is given."""
    from datasets import Dataset

    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if n is not None:
        if len(rows) < n:
            raise SystemExit(f"the workload has {len(rows)} rows, {n} needed: use fewer steps")
        rows = rows[:n]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------- FLOPs

@dataclass
class MatmulUse:
    """One matmul seen in the model's first forward: its shape and which gradients backward computes."""

    in_features: int
    out_features: int
    input_grad: bool   # x.requires_grad: backward computes dL/dx through it
    weight_grad: bool  # W.requires_grad: backward computes dL/dW
    is_head: bool      # the output projection (out == vocab size)

    def flops(self, rows: int) -> int:
        return 2 * self.in_features * self.out_features * rows * (1 + self.input_grad + self.weight_grad)


def step_flops(uses: list[MatmulUse], tokens: int, head_rows: int) -> int:
    """Model FLOPs of one training step (module docstring): body matmuls per real token, head per computed row."""
    return sum(u.flops(head_rows if u.is_head else tokens) for u in uses)


def matmul_modules(model):
    """(name, module, in, out) of every matmul layer: nn.Linear (also LoRA's A/B) and GPT-2's Conv1D."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod, mod.in_features, mod.out_features
        elif isinstance(mod, Conv1D):
            yield name, mod, mod.weight.shape[0], mod.weight.shape[1]


def record_matmuls(model, vocab_size: int) -> tuple[dict[str, MatmulUse], list]:
    """Hooks that fill {module name: MatmulUse} during the next forward; returns (uses, handles)."""
    uses: dict[str, MatmulUse] = {}
    handles = []
    for name, mod, fin, fout in matmul_modules(model):
        def hook(module, args, output, name=name, fin=fin, fout=fout):
            x = args[0] if args else None
            uses[name] = MatmulUse(fin, fout, bool(getattr(x, "requires_grad", False)),
                                   bool(module.weight.requires_grad), fout == vocab_size)
        handles.append(mod.register_forward_hook(hook))
    return uses, handles


# ---------------------------------------------------------------- step meter

def make_step_meter(model, vocab_size: int, warmup: int):
    """A TrainerCallback that times every optimizer step and counts, per step, real tokens and samples (the
    data collator wrapped by `counting`) and rows through the output projection (a forward pre-hook on the
    top model reads its kwargs), and records the matmul uses of the first forward for the FLOP formula."""
    import torch
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.batches: list[tuple[int, int]] = []  # (real tokens, samples) per collated batch
            self.heads: list[int] = []  # rows through the output projection per forward
            self.uses, self._matmul_hooks = record_matmuls(model, vocab_size)
            self._top = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self._last = None
            self.losses: list[float] = []

        def counting(self, collate):
            """`collate` recording each batch's real tokens and samples as it builds them: the same count for
            the baseline's padded batches and tunelab's packed rows, whatever packing does to a batch."""
            def counted(features):
                batch = collate(features)
                ids, mask = batch["input_ids"], batch.get("attention_mask")
                self.batches.append((int(mask.sum()) if mask is not None else ids.numel(), ids.shape[0]))
                return batch
            return counted

        def _count(self, module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            keep = kwargs.get("logits_to_keep")
            # tunelab passes a boolean mask of supervised positions; a plain model(labels=...) computes all
            self.heads.append(int(keep.sum()) if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
                              else ids.numel())

        def on_train_begin(self, args, state, control, **kw):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now
            for h in self._matmul_hooks:  # the first step told us everything; keep later steps hook-free
                h.remove()
            self._matmul_hooks = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # needs logging_steps 1 for one loss per step
                self.losses.append(float(logs["loss"]))

        def summary(self) -> dict[str, Any]:
            if not len(self.batches) == len(self.heads) == len(self.times):
                raise RuntimeError(f"{len(self.batches)} batches and {len(self.heads)} forwards for "
                                   f"{len(self.times)} steps: the bench needs gradient_accumulation_steps 1, "
                                   "no eval and its collator wrapped by counting()")
            uses = list(self.uses.values())
            steps = [{"time": t, "tokens": tokens, "head_rows": head, "samples": samples,
                      "flops": step_flops(uses, tokens, head)}
                     for t, (tokens, samples), head in zip(self.times, self.batches, self.heads)]
            return {"steps": steps, "warmup": warmup, "losses": self.losses, "matmuls": len(uses),
                    "trainable_matmuls": sum(u.weight_grad for u in uses),
                    "input_grad_matmuls": sum(u.input_grad for u in uses)}

        def close(self):
            self._top.remove()

    return StepMeter()


# ---------------------------------------------------------------- process protocol

def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def speed_probe(seconds: float = 1.0) -> float:
    """bf16 GFLOP/s of a 1024^3 matmul right now: how much of the (shared) machine this process gets.
    Workers run it before and after training, so a row measured while the host was busy shows it."""
    from bench.matmul import gflops

    import torch

    return gflops(1024, 1024, 1024, torch.bfloat16, seconds)


def emit(result: dict[str, Any]) -> None:
    """A worker's last word: one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(module: str, config: dict[str, Any], env: dict[str, str] | None = None,
               timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m <module> --worker <json>` in a fresh process; its result dict, or an error record."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(config)]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "process_wall_s": wall}
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {**config, "error": f"exit {proc.returncode}", "log_tail": tail, "process_wall_s": wall}


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def machine() -> dict[str, Any]:
    """What the figures were measured on (printed with every table)."""
    import platform

    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from tunelab.cpu import cpu_class, cpu_flags, emulated

    return {"cpu": cpu, "cpu_class": cpu_class(emulation=emulated()), "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                               else str(o)), encoding="utf-8")
