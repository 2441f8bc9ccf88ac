#!/usr/bin/env bash
# Install megatron_blackmamba and its CPU dependencies into the current Python (idempotent, offline
# apart from the package index). torch is pinned first to the CPU build so that megatron-core's
# own torch requirement does not pull a multi-GB CUDA wheel on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
# Checked from outside the repo: from its root the source tree imports whether installed or not.
if ! (cd / && "$PY" -c "import megatron_blackmamba, megatron.core, tokenizers, zstandard, pyarrow, pytest, psutil, ruff") 2>/dev/null \
   || [ pyproject.toml -nt .setup-stamp ]; then
    "$PY" -m pip install --quiet -e '.[test]'
    touch .setup-stamp
fi
