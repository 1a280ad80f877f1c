#!/usr/bin/env bash
# The test command (README, CI): install, then run the whole suite, including the few slow tests on
# the real default model. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# headless Chromium for the web UI test (marked 'browser'; it skips where Chromium is absent)
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "test.sh: chromium not installed; browser tests will be skipped"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python3 -m pytest -q "$@"
