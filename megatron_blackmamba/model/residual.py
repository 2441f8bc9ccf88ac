"""The residual stream in fp32 (``model.residual_in_fp32``), as Zyphra's released models keep it.

megatron's bias-dropout-add casts the residual to the layer output's dtype before adding
(fused_bias_dropout.py), so MambaLayer's own ``residual_in_fp32`` is undone in bf16 models and its
MoE layers have none. This one adds in fp32: each layer's bf16 output [s, b, h] joins an fp32
stream, and the norms read the stream in the model's dtype (megatron's MambaLayer, the MoE layer in
model/graphed_layers.py, the final norm in model/stack.py): mamba-ssm's unfused ``Block``
arithmetic. Pipeline stages then hand on fp32 (model.builder sets ``pipeline_dtype``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def fp32_bias_dropout_add(training: bool, fused: bool) -> Callable:
    """megatron's ``get_bias_dropout_add`` interface: a function of ((x, bias), residual, p)
    returning ``residual + dropout(x + bias)`` in fp32. ``fused`` is accepted and unused: the
    addition is one elementwise kernel either way."""

    def bias_dropout_add(
        x_with_bias: tuple[torch.Tensor, Optional[torch.Tensor]], residual: torch.Tensor, p: float
    ) -> torch.Tensor:
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return residual.float() + F.dropout(x, p=p, training=training)

    return bias_dropout_add
