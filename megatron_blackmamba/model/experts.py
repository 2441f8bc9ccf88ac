"""megatron's GroupedMLP with the gated activation x routing probability from kernels/glu.py.

GroupedMLP runs its two grouped GEMMs and, between them, ``activation_func_with_probs``: a
torch.compile'd ``act(x1) * x2 * probs``. Only that function changes here (one Triton kernel
each way on GPUs, the same expression in PyTorch elsewhere); weights, sharding and checkpoints
are GroupedMLP's.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from megatron.core.transformer.moe.experts import GroupedMLP

from megatron_blackmamba.kernels.glu import glu_with_probs


class FusedGLUGroupedMLP(GroupedMLP):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.gated_linear_unit:  # GroupedMLP allows only F.silu or F.gelu here
            activation = "silu" if self.config.activation_func is F.silu else "gelu"
            self.activation_func_with_probs = partial(glu_with_probs, activation=activation)
