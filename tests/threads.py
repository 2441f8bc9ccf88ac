"""An autouse fixture for test packages that run many tiny-model forwards in the pytest process.

Tiny matmuls on a busy 2-CPU machine are ~20x slower with torch's default thread pool (threads
spin waiting for each other) than with one thread; spawned ranks already run with one thread.
Import it into a package's conftest.py to apply it there.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
