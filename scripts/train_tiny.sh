#!/usr/bin/env bash
# The main job: set up, then train the tiny BlackMamba on the bundled sample corpus (CPU, minutes).
# Extra arguments are config overrides, e.g. scripts/train_tiny.sh training.train_iters=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m megatron_blackmamba.train --config configs/tiny.yaml "$@"
