#!/usr/bin/env bash
# Fresh machine -> set up, then generate on the embedded default model with its shipped exits,
# reporting acceptance rate and the speedup over full-model decoding of the same prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/balspec generate "${1:-Explain in three sentences why the sky is blue.}" --compare --max-new-tokens 128
