"""The GPU benchmarks import and plan on CPU (--dry-run); they are run for real on a GPU only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DRY_RUNS = {
    "train_throughput.py": "gpt-dense: kernels=cuda scan=auto model=gpt",
    "profile_step.py": "kernel classes: selective scan",
    "host_lead.py": "blackmamba-grouped: marks at each of ['mamba', 'moe']",
    "generation_latency.py": "contexts [1024, 4096, 16384, 65536]",
    "grouped_gemm_check.py": "fc1 (geglu)",
    "gpu_kernel_check.py": "340m-b2",
    "mixer_gpu_check.py": "cuda vs torch kernels",
    "triton_kernels.py": "cross-entropy [32768, 50304] bf16",
    "scan_kernels.py": "mamba-ssm, blackmamba at [16, 2304, 2048] bfloat16",
    "eval_throughput.py": "200 documents each",
    "precision_ab.py": "training.fp8=rowwise",
    "top1_experts_check.py": "launch shapes per kernel",
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


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_throughput.py"), *args, "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sequence_sweep_keeps_the_tokens_per_micro_batch_and_step():
    result = _dry_run(
        "--variants",
        "blackmamba-grouped,gpt-dense",
        "--seq-lengths",
        "2048,32768",
        "training.micro_batch_size=16",
        "training.global_batch_size=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "blackmamba-grouped seq 2048",
        "gpt-dense seq 2048",
        "blackmamba-grouped seq 32768",
        "gpt-dense seq 32768",
    ]
    for line in lines[2:]:  # the last override wins: 16 x 2048 = 1 x 32768 tokens
        assert (
            "'training.seq_length=32768', 'training.micro_batch_size=1',"
            " 'training.global_batch_size=4'" in line
        )


def test_a_length_that_does_not_divide_the_micro_batch_is_refused():
    result = _dry_run("--seq-lengths", "3000", "training.micro_batch_size=16")
    assert result.returncode != 0 and "3000 does not divide the 32768 tokens" in result.stderr


def test_kernel_totals_groups_by_cut_name_longest_first(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from types import SimpleNamespace

    from harness import kernel_totals

    def event(name: str, us: float):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("gemm_a", 2.0), event("add", 5.0), event("gemm_b", 4.0), event("add", 1.5)]
    assert kernel_totals(events, name_width=4) == [("add", 2, 6.5), ("gemm", 2, 6.0)]
