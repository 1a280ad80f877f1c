"""`tunelab export`: merge tunelab checkpoints into a standalone HF model directory.

    tunelab export --checkpoint_dir runs/x --export_dir models/x [--export_size 2GB] [--export_dtype bfloat16]
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('models/x')"

The directory holds safetensors shards of at most --export_size each (plus an index when there are
several), config, generation config, the tokenizer, and tunelab_export.json (base model, checkpoints,
method). Plain `transformers` loads it; tunelab is not needed. LoRA adapters are merged into the weights
(several, in order), Freeze and full checkpoints already are weights. P-Tuning v2 cannot be merged: its
prefix is extra keys/values fed to attention, not a change of any weight (serve it with `tunelab serve`).

Chat template: the tokenizer's own (`--template auto`) with the run's `source_prefix` as the default system
prompt, used when a conversation has no system message of its own. That needs a template that renders a
system role; for one that does not (it raises, or drops the system text) the template is kept as is and a
warning says the prefix is not in it. Runs trained with `--template chatglm|plain` format prompts without
the tokenizer's template: their export keeps the tokenizer's template and warns likewise.

The export is written to a temporary folder beside --export_dir and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.hparams import Args, _opt, parse_with
from tunelab.paths import apply_umask

logger = logging.getLogger(__name__)

EXPORT_FILE = "tunelab_export.json"
DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass
class ExportArguments:
    export_dir: str | None = _opt(None, "Folder to write the merged model into (required).")
    export_size: str = _opt("2GB", "Largest safetensors shard, e.g. 500MB, 2GB, 1GiB.")
    export_dtype: str = _opt("float32", f"Weight dtype of the export: {', '.join(DTYPES)}.", choices=list(DTYPES))


def parse_size(text: str) -> int:
    """Bytes in a size like '2GB' (10^9), '1GiB' (2^30), '500KB' or '1024'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise TunelabError(f"--export_size '{text}' is not a size: use e.g. 500MB, 2GB or 1GiB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise TunelabError(f"--export_size must be positive, got '{text}'")
    return size


# ---- chat template (pure: strings in, string out) ----

def with_default_system(chat_template: str, system: str) -> str:
    """A Jinja chat template that puts `system` first when a conversation has no system message."""
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja string literal
    head = ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
            "{%- endif -%}")
    return head + chat_template


def renders_system(tokenizer, chat_template: str) -> bool:
    """Whether the template writes a system message's text (some raise on the role, some drop it)."""
    marker = "tunelab-system-marker"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    except Exception:  # jinja raise_exception('System role not supported') and the like
        return False
    return marker in text


def export_chat_template(tokenizer, template_name: str, source_prefix: str | None) -> str | None:
    """The chat template to ship: the tokenizer's, with source_prefix as default system prompt where it fits."""
    base = tokenizer.chat_template
    if not source_prefix:
        return base
    if template_name != "auto" or not base:
        logger.warning("the run used --template %s: the exported chat template does not carry its format or "
                       "the source_prefix; pass the prefix as the system message yourself", template_name)
        return base
    if not renders_system(tokenizer, base):
        logger.warning("the model's chat template has no system role: source_prefix is not in the export")
        return base
    return with_default_system(base, source_prefix)


# ---- export ----

def check_checkpoints(ckpts: list[str]) -> list[dict]:
    """Methods of the checkpoints; refuses those that cannot merge (P-Tuning v2) before anything is loaded."""
    from tunelab.methods import get_method, read_method

    if not ckpts:
        raise TunelabError("give --checkpoint_dir: export merges tunelab checkpoints into their base model")
    metas = [read_method(c) for c in ckpts]
    for ckpt, meta in zip(ckpts, metas):
        method = get_method(meta["finetuning_type"], f" in checkpoint {ckpt}")
        if method.merge is None:  # P-Tuning v2: its prefix is extra attention keys/values
            raise TunelabError(
                f"{ckpt} is a {method.label} checkpoint, which cannot be merged into the model: what it trained "
                "is not a change of any of the model's weights. Serve it with `tunelab serve` or `tunelab chat`.")
    return metas


def check_export_dir(path: str | None, overwrite: bool, ckpts: list[str] = ()) -> Path:
    """The export folder: refused when it is used (unless `overwrite`), or when it is, lies inside or holds
    one of the checkpoints it exports (replacing it would delete them)."""
    if not path:
        raise TunelabError("give --export_dir: the folder to write the merged model into")
    out = Path(path)
    for ckpt in ckpts:
        here, there = out.resolve(), Path(ckpt).resolve()
        if here.is_relative_to(there) or there.is_relative_to(here):
            raise TunelabError(f"--export_dir {out} {'is' if here == there else 'overlaps'} the checkpoint {ckpt}: "
                               "writing the export there would delete it; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise TunelabError(f"export directory {out} is not empty: pass --overwrite_output_dir to replace it")
    return out


def export(args: Args, opts: ExportArguments) -> Path:
    """Merge, then write the standalone model directory; returns it."""
    import torch

    from tunelab.methods import split_checkpoints
    from tunelab.setup import setup_model

    ckpts = split_checkpoints(args.model.checkpoint_dir)
    metas = check_checkpoints(ckpts)
    out = check_export_dir(opts.export_dir, args.run.overwrite_output_dir, ckpts)
    shard_bytes = parse_size(opts.export_size)
    loaded = setup_model(args, "export")  # LoRA merged; freeze/full are plain weights now
    model, tokenizer, data = loaded.model.to(getattr(torch, opts.export_dtype)), loaded.tokenizer, loaded.args.data
    tokenizer.chat_template = export_chat_template(tokenizer, data.template, data.source_prefix)
    record = {"base_model": loaded.base_path, "checkpoints": ckpts,
              "methods": [m["finetuning_type"] for m in metas], "source_prefix": data.source_prefix,
              "template": data.template, "dtype": opts.export_dtype}
    write_atomically(out, lambda tmp: _write(tmp, model, tokenizer, shard_bytes, record))
    logger.info("exported %s to %s", ", ".join(ckpts), out)
    return out


def _write(tmp: Path, model, tokenizer, shard_bytes: int, record: dict) -> None:
    model.save_pretrained(tmp, max_shard_size=shard_bytes, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


def write_atomically(out: Path, write) -> None:
    """write(tmp) into a temp folder beside `out`, then swap it in: no half-written export is ever left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():  # checked empty or --overwrite_output_dir before
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        apply_umask(tmp)  # mkdtemp and safetensors make owner-only files; the export is an ordinary folder
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    args, opts = parse_with(argv, ExportArguments, prog="tunelab export")
    out = export(args, opts)
    print(f"tunelab export: wrote {out}", flush=True)
    return 0
