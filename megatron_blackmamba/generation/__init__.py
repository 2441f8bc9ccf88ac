"""Text generation with BlackMamba's recurrent (constant-memory) state."""

from megatron_blackmamba.generation.decode_graph import DecodeStep
from megatron_blackmamba.generation.generate import generate, prefill, stack_states
from megatron_blackmamba.generation.sampling import (
    SamplingParams,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "DecodeStep",
    "SamplingParams",
    "generate",
    "prefill",
    "sample",
    "stack_states",
    "top_k_filter",
    "top_p_filter",
]
