#!/usr/bin/env bash
# One-node launcher (workstation, CPU box, or a single GPU node outside SLURM).
#
#   launch/local.sh [NPROC] CONFIG [section.field=value ...]
#   launch/local.sh configs/tiny.yaml                    # 1 process: plain `python -m`
#   launch/local.sh 2 configs/tiny.yaml                  # torchrun --standalone, 2 ranks (gloo on CPU)
#   launch/local.sh 8 configs/blackmamba-340m-1.5b.yaml  # 8 GPUs of one node (NCCL)
#   DRY_RUN=1 launch/local.sh 2 configs/tiny.yaml        # print the command, run nothing
#
# NPROC defaults to 1. On CPU, OMP_NUM_THREADS defaults to (cores / NPROC), at least 1, so the
# ranks do not oversubscribe the machine (torchrun alone would force 1 thread per rank). The
# trainer resumes from the newest checkpoint in checkpoint.save, so rerunning the same command
# after an interruption continues the run.
set -euo pipefail

die() { echo "local.sh: error: $*" >&2; exit 1; }

NPROC=1
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    NPROC="$1"
    shift
fi
((NPROC >= 1)) || die "NPROC must be >= 1"
[[ $# -ge 1 ]] || die "usage: launch/local.sh [NPROC] CONFIG [section.field=value ...]"
CONFIG="$1"
shift

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found (relative to $REPO_DIR)"
PYTHON="${PYTHON:-python}"

cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
threads=$((cores / NPROC))
((threads >= 1)) || threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export PYTHONUNBUFFERED=1
# Ranks come from torchrun (or nothing, for one process); stale values would mislead the trainer.
unset RANK WORLD_SIZE LOCAL_RANK SLURM_PROCID SLURM_NTASKS SLURM_LOCALID

if ((NPROC == 1)); then
    CMD=("$PYTHON" -m megatron_blackmamba.train --config "$CONFIG" "$@")
else
    if command -v torchrun >/dev/null 2>&1; then
        LAUNCHER=(torchrun)
    else
        LAUNCHER=("$PYTHON" -m torch.distributed.run)
    fi
    CMD=("${LAUNCHER[@]}" --standalone --nproc_per_node="$NPROC" -m megatron_blackmamba.train --config "$CONFIG" "$@")
fi

echo "+ OMP_NUM_THREADS=${OMP_NUM_THREADS} $(printf '%q ' "${CMD[@]}")" >&2
if [[ "${DRY_RUN:-0}" != 0 ]]; then
    exit 0
fi
exec "${CMD[@]}"
