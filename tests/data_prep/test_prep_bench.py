"""The throughput benchmark runs (dry run only: no timings in tests)."""

import subprocess
import sys

from .prep_helpers import REPO


def test_bench_dry_run():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "data_prep_throughput.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "workers [1, 2]" in result.stdout
