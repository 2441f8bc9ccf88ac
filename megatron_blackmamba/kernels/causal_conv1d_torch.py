"""Pure-PyTorch depthwise causal conv1d (Mamba's short conv) and its single-step decode update.

Mirrors the ``causal_conv1d`` package: compute in fp32 (fp64 for fp64 inputs), return in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan_torch import compute_dtype

ACTIVATIONS = (None, "silu", "swish")


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y if activation is None else F.silu(y)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,) -> (batch, dim, seqlen).

    Output t sees inputs t-width+1 .. t (zero left padding). Autocast is disabled so that an
    enclosing bf16 autocast region cannot silently lower the conv to bf16 math.
    """
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"causal_conv1d: x must be (batch, {dim}, seqlen), got {tuple(x.shape)}")
    dtype = compute_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        y = F.conv1d(
            x.to(dtype),
            weight.to(dtype).unsqueeze(1),
            None if bias is None else bias.to(dtype),
            padding=width - 1,
            groups=dim,
        )
    return _activate(y[..., : x.shape[-1]], activation).to(x.dtype)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """One decode step. x: (batch, dim); conv_state: (batch, dim, state_len) updated IN PLACE.

    Mamba keeps state_len == width; any state_len >= width-1 works (as in causal_conv1d >= 1.2):
    the output convolves the last width-1 stored inputs and x, then the state shifts left by one
    and appends x. Returns (batch, dim) in x's dtype.
    """
    width = weight.shape[-1]
    state_len = conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state length {state_len} < width-1 = {width - 1}")
    dtype = compute_dtype(x.dtype)
    window = torch.cat(
        [conv_state[..., state_len - (width - 1) :].to(dtype), x.to(dtype).unsqueeze(-1)], dim=-1
    )
    y = (window * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    out = _activate(y, activation).to(x.dtype)  # before mutating: a bad activation leaves the state
    conv_state.copy_(torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)[..., 1:])
    return out
