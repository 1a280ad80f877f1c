"""What makes a run directory self-describing: the resolved options, the environment, and the guard
that refuses to write into a used directory. Reports read only these files.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab import integrity
from tunelab.hparams import Args, TunelabError

logger = logging.getLogger(__name__)

ARGS_FILE = "tunelab_args.json"
ENV_FILE = "env.json"
_PACKAGES = ("tunelab", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "tokenizers")


def check_output_dir(args: Args) -> Path:
    """Fail before anything is written when output_dir holds an earlier run and nothing says to reuse it."""
    out = Path(args.training.output_dir)
    reuse = args.run.overwrite_output_dir or args.training.resume_from_checkpoint
    if out.is_dir() and any(out.iterdir()) and not reuse:
        raise TunelabError(f"output directory {out} is not empty: pass --overwrite_output_dir to write over it "
                           "or --resume_from_checkpoint to continue the run in it")
    return out


def git_sha(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(seed: int) -> dict[str, Any]:
    import torch

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "versions": versions,
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "command": sys.argv,
    }


def write_json(path: Path, data: Any) -> None:
    """Through a temp file renamed when complete (tunelab/integrity.py): never half a JSON file."""
    integrity.write_json(path, data)


def save_results(out: Path, split: str, metrics: dict[str, Any]) -> None:
    """<split>_results.json, and the metrics merged into all_results.json (what HF's save_metrics writes)."""
    merged = integrity.read_json(out / "all_results.json")
    write_json(out / "all_results.json", {**(merged if isinstance(merged, dict) else {}), **metrics})
    write_json(out / f"{split}_results.json", metrics)  # last: a study reads it as "this stage finished"


def write_run_files(out: Path, args: Args, extra: dict[str, Any] | None = None) -> None:
    """tunelab_args.json (every resolved option) and env.json (versions, git sha, seed) into out."""
    write_json(out / ARGS_FILE, args.to_dict())
    write_json(out / ENV_FILE, environment(args.training.seed))
    for name, data in (extra or {}).items():
        write_json(out / name, data)


def read_run_args(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / ARGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
