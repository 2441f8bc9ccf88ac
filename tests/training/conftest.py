"""Shared tiny training setup: the bundled sample corpus, built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_blackmamba.data_prep.sample import ensure_sample_dataset

TINY_TRAIN = [
    "model.vocab_size=8192",
    "model.hidden_size=32",
    "model.num_layers=4",
    "model.d_state=4",
    "model.max_seq_length=32",
    "training.seq_length=32",
    "training.micro_batch_size=2",
    "training.global_batch_size=4",
    "training.train_iters=6",
    "training.warmup_iters=2",
    "training.lr=3e-3",
    "training.min_lr=3e-4",
    "training.eval_interval=0",
    "training.log_interval=1",
    "training.precision=fp32",
    "checkpoint.save_interval=2",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> str:
    cache = tmp_path_factory.mktemp("data_cache")
    ensure_sample_dataset(str(cache))
    return str(cache)


def tiny_overrides(cache: str, run_dir: Path, *extra: str) -> list[str]:
    return TINY_TRAIN + [
        f"data.cache_dir={cache}",
        f"checkpoint.save={run_dir / 'ckpt'}",
        f"logging.metrics_jsonl={run_dir / 'metrics.jsonl'}",
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics file (later lines win, as after a resume)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


REPO = Path(__file__).resolve().parents[2]


def train_cli(overrides: list[str]) -> list[str]:
    """The training entry point from built-in defaults plus ``overrides`` (no config file)."""
    return [sys.executable, "-m", "megatron_blackmamba.train", "--config=", *overrides]


def run_train(overrides: list[str]) -> subprocess.CompletedProcess:
    """Run a training job to completion; on failure show its stderr, not just the exit code."""
    result = subprocess.run(
        train_cli(overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    if result.returncode != 0:
        raise AssertionError(f"training exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result
