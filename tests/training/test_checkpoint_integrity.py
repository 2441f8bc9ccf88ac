"""A checkpoint that never committed, or whose files were damaged, is refused; the previous one is
used."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from megatron_blackmamba.checkpointing.store import MANIFEST, find_resumable, verify
from tests.training.conftest import run_train, tiny_overrides


@pytest.fixture(scope="module")
def saved_run(sample_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved")
    overrides = tiny_overrides(
        sample_cache,
        run,
        "training.train_iters=4",
        f"logging.tensorboard_dir={run / 'tb'}",
        "logging.wandb_project=blackmamba-test",
        "logging.wandb_mode=offline",
        f"logging.wandb_dir={run / 'wandb'}",
    )
    run_train(overrides)
    return run / "ckpt"


def test_loggers_wrote_offline(saved_run):
    """tensorboard events and an offline wandb run exist, with no network."""
    run = saved_run.parent
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert list((run / "wandb").rglob("offline-run-*")), "wandb offline run directory missing"


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def test_rerun_at_the_last_step_says_there_is_nothing_to_train(saved_run, sample_cache, tmp_path):
    _copy(saved_run, tmp_path)
    result = run_train(tiny_overrides(sample_cache, tmp_path, "training.train_iters=4"))
    assert "done: already at step 4 (nothing to train" in result.stderr


def test_intact_checkpoint_is_chosen(saved_run):
    assert (saved_run / "latest").read_text().strip() == "iter_0000004"
    assert verify(saved_run / "iter_0000004") is None
    assert find_resumable(saved_run) == saved_run / "iter_0000004"
    manifest = json.loads((saved_run / "iter_0000004" / MANIFEST).read_text())
    assert manifest["iteration"] == 4 and manifest["has_optimizer"] and manifest["files"]


def test_truncated_shard_falls_back_to_previous(saved_run, tmp_path, caplog):
    ckpt = _copy(saved_run, tmp_path)
    shard = next((ckpt / "iter_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        chosen = find_resumable(ckpt)
    assert chosen == ckpt / "iter_0000002"
    assert "truncated" in caplog.text and shard.name in caplog.text


def test_uncommitted_save_is_ignored(saved_run, tmp_path, caplog):
    ckpt = _copy(saved_run, tmp_path)
    # A save killed before committing: the rename never happened, the pointer was never moved.
    half = ckpt / "iter_0000006.tmp"
    shutil.copytree(ckpt / "iter_0000004", half)
    (half / MANIFEST).unlink()
    assert find_resumable(ckpt) == ckpt / "iter_0000004"
    # A directory that lost its manifest is refused with the reason.
    (ckpt / "iter_0000004" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert find_resumable(ckpt) == ckpt / "iter_0000002"
    assert "never committed" in caplog.text


def test_resume_skips_damaged_checkpoint(saved_run, sample_cache, tmp_path):
    ckpt = _copy(saved_run, tmp_path)
    shard = next((ckpt / "iter_0000004").glob("*.distcp"))
    shard.write_bytes(b"")
    overrides = tiny_overrides(sample_cache, tmp_path, "training.train_iters=4")
    result = run_train(overrides)
    assert "skipping checkpoint" in result.stderr and "iter_0000004" in result.stderr
    assert "loaded checkpoint" in result.stderr and "iteration 2" in result.stderr
