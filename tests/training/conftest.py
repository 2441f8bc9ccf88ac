"""Shared tiny training setup: the bundled sample corpus, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.sample import ensure_sample_dataset

TINY_TRAIN = [
    "model.vocab_size=8192", "model.hidden_size=32", "model.num_layers=4", "model.d_state=4",
    "model.max_seq_length=32", "training.seq_length=32", "training.micro_batch_size=2",
    "training.global_batch_size=4", "training.train_iters=6", "training.warmup_iters=2",
    "training.lr=3e-3", "training.min_lr=3e-4", "training.eval_interval=0", "training.log_interval=1",
    "training.precision=fp32", "checkpoint.save_interval=2", "logging.progress_bar=false",
]


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> str:
    cache = tmp_path_factory.mktemp("data_cache")
    ensure_sample_dataset(str(cache))
    return str(cache)


def tiny_overrides(cache: str, run_dir: Path, *extra: str) -> list[str]:
    return TINY_TRAIN + [
        f"data.cache_dir={cache}", f"checkpoint.save={run_dir / 'ckpt'}",
        f"logging.metrics_jsonl={run_dir / 'metrics.jsonl'}", *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics file (later lines win, as after a resume)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out
