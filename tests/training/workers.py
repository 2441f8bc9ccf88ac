"""Rank body for multi-process training tests (importable by spawned processes)."""

from __future__ import annotations

from megatron_blackmamba.config import load_config
from megatron_blackmamba.parallel.setup import destroy
from megatron_blackmamba.training.loop import train


def train_job(overrides: list[str]) -> None:
    try:
        train(load_config(None, overrides))
    finally:
        destroy()
