#!/usr/bin/env bash
# The test suite (what CI runs): set up, lint (ruff, configured in pyproject.toml), then pytest.
# Fails on a lint or format error, and if pytest collects no tests.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
"${PYTHON:-python3}" -m ruff check . || { echo "ruff check failed: fix the lint errors above" >&2; exit 1; }
"${PYTHON:-python3}" -m ruff format --check . \
    || { echo "ruff format: run 'ruff format .' on the files above" >&2; exit 1; }
"${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=15 "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
