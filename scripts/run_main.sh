#!/usr/bin/env bash
# tunelab's main job on a fresh machine: install, then run the quick English study (the 2023 22-run grid
# + base model) on the embedded SmolLM2-135M-Instruct and shipped data; report in runs/study_2023_04_24/.
# Extra arguments go to `tunelab study` (e.g. --scale full --workers 8 --devices cuda:0,...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec tunelab study examples/study_2023_04_24.yaml "$@"
