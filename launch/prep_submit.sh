#!/usr/bin/env bash
# =================================================================================================
# Submit data preparation to SLURM: per source one job array (one task per element) and a
# finalize job that runs once the whole array succeeded (afterok); for a mixture, one such pair
# per source, then a job that writes the blend once every source is finalized.
#
#   launch/prep_submit.sh [--tasks N] [--cpus C] [--sbatch-args "..."] build BUILD-ARGS...
#   launch/prep_submit.sh [--tasks N] [--cpus C] [--sbatch-args "..."] mixture MIXTURE.yaml \
#       --output-dir DIR [--tokenizer T]
#   DRY_RUN=1 launch/prep_submit.sh ...    print the sbatch commands (job ids shown as <...>)
#
# N tasks (default 16) split each source by input file (sorted, byte-balanced); C cores per task
# (default 16) become its --workers. Run from the repository root; PYTHON names the interpreter.
# =================================================================================================
set -euo pipefail

die() { echo "prep_submit.sh: error: $*" >&2; exit 1; }
TASKS=16
CPUS=16
SBATCH_ARGS=""
while (($#)); do
    case "$1" in
        --tasks) TASKS="$2"; shift 2 ;;
        --cpus) CPUS="$2"; shift 2 ;;
        --sbatch-args) SBATCH_ARGS="$2"; shift 2 ;;
        build|mixture) break ;;
        *) die "unknown option $1 (usage: see the header of $0)" ;;
    esac
done
(($#)) || die "give 'build BUILD-ARGS...' or 'mixture MIXTURE.yaml --output-dir DIR'"
[[ "$TASKS" =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive integer, got '$TASKS'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer, got '$CPUS'"
MODE="$1"
shift
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREP="$REPO_DIR/launch/prep.sbatch"
PYTHON="${PYTHON:-python}"
read -r -a EXTRA <<< "$SBATCH_ARGS"

# sbatch ARGS...: the new job's id (DRY_RUN: print the command; the id is <job name>).
submit() {
    if [[ "${DRY_RUN:-0}" != 0 ]]; then
        local arg name=job
        for arg in "$@"; do [[ "$arg" == --job-name=* ]] && name="${arg#--job-name=}"; done
        echo "sbatch --parsable $(printf '%q ' "$@")" >&2
        echo "<${name}>"
    else
        sbatch --parsable "$@" | cut -d';' -f1
    fi
}

# One source: the array, then its finalize; prints the finalize job's id.
submit_source() {
    local name="$1" array
    shift
    array=$(submit --job-name="prep-${name}" --array="0-$((TASKS - 1))" --cpus-per-task="$CPUS" \
        ${EXTRA[@]+"${EXTRA[@]}"} "$PREP" "$@")
    submit --job-name="prep-${name}-finalize" --dependency="afterok:${array}" --cpus-per-task=1 \
        ${EXTRA[@]+"${EXTRA[@]}"} "$PREP" "$@" --finalize
}

case "$MODE" in
    build)
        submit_source "$(basename "${*: -1}")" "$@" >/dev/null
        ;;
    mixture)
        (($#)) || die "mixture needs MIXTURE.yaml --output-dir DIR"
        MIXTURE_ARGS=("$@")
        builds=$("$PYTHON" -m megatron_blackmamba.data_prep mixture "$@" --print-builds) \
            || die "could not read the mixture (see above)"
        finals=()
        while IFS=$'\t' read -r name args; do
            eval "set -- $args"  # the arguments as blackmamba-prep printed them, shell-quoted
            finals+=("$(submit_source "$name" "$@")")
        done <<< "$builds"
        deps=$(IFS=:; echo "${finals[*]}")
        mixture_args=$(printf '%q ' "$PYTHON" -m megatron_blackmamba.data_prep mixture "${MIXTURE_ARGS[@]}" --summary-only)
        submit --job-name=prep-blend --dependency="afterok:${deps}" --cpus-per-task=1 \
            ${EXTRA[@]+"${EXTRA[@]}"} --wrap="cd $(printf '%q' "$REPO_DIR") && ${mixture_args}" >/dev/null
        ;;
esac
