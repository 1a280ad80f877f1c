"""Where tunelab keeps its local caches (converted models, tokenized data, base-model predictions), which
Hub model a local model folder is, and the file modes of what tunelab writes.

`TUNELAB_CACHE` overrides the root (default `~/.cache/tunelab`). Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from tunelab.names import DEFAULT_MODEL_HUB_ID


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def cache_dir(kind: str) -> Path:
    """`<cache_root>/<kind>` (models, datasets, predictions), created on first use."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: the file name of a cache entry that depends on all of them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else by the set-and-restore
    idiom."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, recursive: bool = True) -> None:
    """Give `path` (a file, or a folder and the files in it) the mode a plain open() / mkdir() gets under the
    user's umask: 0644 / 0755 under umask 022.

    Workaround: safetensors (0.6+) writes through a private temp file renamed into place, so every
    .safetensors file — ours and those of peft's / transformers' save_pretrained — comes out 0600 whatever
    the umask, and mkdtemp folders are 0700; a run's weights are meant to be shared (a cluster's shared
    folder, the Hub). Remove when safetensors creates its files with the umask's mode."""
    mask = current_umask()
    root = Path(path)
    paths = [root] if root.is_file() else [root, *(root.rglob("*") if recursive else root.iterdir())]
    for p in paths:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name


def hub_id(path: str | os.PathLike | None) -> str | None:
    """The Hugging Face Hub id of the model in the local folder `path`, when known: the embedded default's
    converted folder (DEFAULT_MODEL_HUB_ID), a HF-cache snapshot (`models--org--name/snapshots/<rev>`), or a
    folder whose config.json records a Hub-style `_name_or_path` (org/name); else None."""
    if not path:
        return None
    p = Path(path)
    if p.parent == cache_root() / "models" and p.name.startswith(DEFAULT_MODEL_HUB_ID.split("/")[-1] + "-"):
        return DEFAULT_MODEL_HUB_ID
    if len(p.parts) >= 3 and p.parts[-2] == "snapshots" and p.parts[-3].startswith("models--"):
        return p.parts[-3][len("models--"):].replace("--", "/", 1)
    try:
        recorded = json.loads((p / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and not Path(recorded).exists():
        return recorded
    return None
