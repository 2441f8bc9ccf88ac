"""A tiny trained checkpoint (config and tokenizer inside) shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.conftest import run_train, sample_cache, tiny_overrides  # noqa: F401


@pytest.fixture(scope="session")
def tiny_ckpt(sample_cache, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("eval_run")
    run_train(
        tiny_overrides(
            sample_cache,
            run,
            "training.train_iters=4",
            "training.seq_length=16",
            "model.max_seq_length=16",
        )
    )
    return run / "ckpt"
