"""Checkpoints: exact resume after kill -9, and resume at another TP / PP / EP layout.

Reference: one uninterrupted 6-step single-process run that saves every 2 steps. The tiny model
runs in fp32, where TP/PP/EP change only summation order (see tests/parallel), so a resharded
resume must reproduce the reference losses to 1e-4 relative, and a same-layout resume exactly.
(Fresh initialisation is not layout-invariant, so parallel runs start from the reference's
checkpoint: that also exercises single-process -> parallel resharding.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.multiproc import run_ranks
from tests.training.conftest import REPO, losses, run_train, tiny_overrides, train_cli
from tests.training.workers import train_job


@pytest.fixture(scope="module")
def reference_run(sample_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    run_train(tiny_overrides(sample_cache, run))
    return run


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    ref = losses(reference_run)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < ref[1], "loss should fall over the reference run"
    return ref


def test_kill_minus_9_then_resume_is_exact(sample_cache, reference, tmp_path):
    cmd = train_cli(tiny_overrides(sample_cache, tmp_path))
    # Its own process group, killed whole like a scheduler kills a job (checkpoint writer included).
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    committed = tmp_path / "ckpt" / "iter_0000004" / "blackmamba_checkpoint.json"
    deadline = time.time() + 300
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert committed.exists(), "the run never committed its step-4 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_train(tiny_overrides(sample_cache, tmp_path))
    resumed = losses(tmp_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert resumed[step] == reference[step], (
            f"step {step}: {resumed[step]} != {reference[step]}"
        )


@pytest.mark.parametrize(
    "name, layout",
    [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]), ("ep2", ["parallel.ep=2"])],
)
def test_reshard_single_to_parallel_and_back(
    sample_cache, reference_run, reference, tmp_path, name, layout
):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(reference_run / "ckpt" / "iter_0000002", ckpt / "iter_0000002")
    (ckpt / "latest").write_text("iter_0000002")
    # steps 3-4 at the parallel layout, from the single-process step-2 checkpoint
    run_ranks(
        2, train_job, tiny_overrides(sample_cache, tmp_path, "training.stop_after=2", *layout)
    )
    assert (ckpt / "iter_0000004" / "blackmamba_checkpoint.json").is_file()
    # steps 5-6 back in one process, from the parallel step-4 checkpoint
    run_ranks(1, train_job, tiny_overrides(sample_cache, tmp_path))
    got = losses(tmp_path)
    assert sorted(got) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-4), f"{name} step {step}"
