"""The GPU benchmarks import and plan on CPU (--dry-run); they are run for real on a GPU only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DRY_RUNS = {
    "train_throughput.py": "gpt-dense: kernels=cuda scan=auto gpt=True",
    "profile_step.py": "kernel classes: selective scan",
    "host_lead.py": "blackmamba-grouped: marks at each of ['mamba', 'moe']",
    "generation_latency.py": "contexts [1024, 4096, 16384, 65536]",
    "grouped_gemm_check.py": "fc1 (geglu)",
    "gpu_kernel_check.py": "340m-b2",
    "mixer_gpu_check.py": "cuda vs torch kernels",
    "triton_kernels.py": "cross-entropy [32768, 50304] bf16",
    "scan_kernels.py": "mamba-ssm, blackmamba at [16, 2304, 2048] bfloat16",
    "eval_throughput.py": "200 documents each",
}


@pytest.mark.parametrize("script", sorted(DRY_RUNS))
def test_dry_run_prints_its_plan(script: str):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert DRY_RUNS[script] in result.stdout


def test_unknown_variant_is_refused():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_throughput.py"),
            "--variants",
            "blackmamba-cuda,nope",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "unknown variants ['nope']" in result.stderr


@pytest.mark.parametrize("script", ["gpu_env.sh", "pack_gpu_deps.sh"])
def test_shell_scripts_parse(script: str):
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / script)]).returncode == 0
