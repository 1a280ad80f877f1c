"""Where tunelab keeps its local caches (converted models, tokenized data, base-model predictions).

`TUNELAB_CACHE` overrides the root (default `~/.cache/tunelab`). Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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
