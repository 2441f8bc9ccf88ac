"""The tiny generation model the generation tests share."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.config import load_config
from megatron_blackmamba.generation import SamplingParams
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.parallel.setup import init_distributed

VOCAB = 384
# init_method_std=0.3 makes logits decisive, so greedy choices are not near-ties.
TINY = [
    f"model.vocab_size={VOCAB}",
    "model.hidden_size=32",
    "model.num_layers=4",
    "model.d_state=4",
    "model.num_experts=4",
    "model.ffn_hidden_size=48",
    "model.init_method_std=0.3",
    "training.precision=fp32",
]
GREEDY = SamplingParams(greedy=True)


@pytest.fixture
def model():
    if torch.cuda.is_available():
        pytest.skip(
            "CPU tests: with a GPU, megatron builds the model there (the GPU decode path is "
            "tests/generation/test_decode_graph.py::test_graph_replay_is_bit_identical_to_eager_steps)"
        )
    job = load_config(None, TINY)
    init_distributed(job.parallel, seed=5)
    return build_model(job).eval()
