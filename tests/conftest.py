"""Single-process megatron parallel state for model-level tests (a 1-rank gloo group)."""

from __future__ import annotations

import pytest

from megatron_blackmamba.config import load_config
from megatron_blackmamba.parallel.setup import destroy, init_distributed


@pytest.fixture(scope="module")
def single_rank():
    init_distributed(load_config(None, []).parallel, seed=0)
    yield
    destroy()
