"""One Mamba-1 decode step from in_proj's output to out_proj's input: conv, x_proj, dt_proj, scan.

Why: a decode step at batch 1 is bound by its kernel launches, not by the bytes it reads
(bench/PERF_NOTES.md, "Decode"). Between in_proj and out_proj the unfused step runs four kernels
per layer (the conv update, the x_proj and dt_proj GEMVs, the state update), each reading a few
hundred KB. ``ssm_decode`` runs them as two Triton kernels (kernels/mamba_decode_triton.py) on
CUDA tensors; elsewhere, or under TP (x_proj's output is then a partial sum to all-reduce), it
runs the unfused step below, which the kernels are tested against. Both round where the unfused
GPU step rounds: the conv output, x_proj's and dt_proj's outputs to the model dtype.

Shapes: x, z [b, d] (rows may be strided: in_proj's [x | z] halves); conv_state [b, d, W] and
ssm_state [b, d, N] advanced in place; conv_weight [d, W]; conv_bias [d] or None; x_proj_weight
[R + 2N, d]; dt_proj_weight [d, R]; A [d, N], D [d], dt_bias [d] fp32. Returns y [b, d] in x's
dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_blackmamba.kernels import causal_conv1d_update, selective_state_update
from megatron_blackmamba.kernels.triton_support import takes, triton_kernels

_MODULE = "mamba_decode_triton"
_kernels = partial(triton_kernels, _MODULE)


def ssm_decode_unfused(
    x: Tensor,
    z: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    x_proj: Callable[[Tensor], Tensor],
    dt_proj_weight: Tensor,
    A: Tensor,
    D: Tensor,
    dt_bias: Tensor,
) -> Tensor:
    """The step as four kernels; ``x_proj`` maps u [b, d] to [b, R + 2N] (summed over TP)."""
    u = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, activation="silu")
    rank, d_state = dt_proj_weight.shape[1], A.shape[1]
    dt, B, C = x_proj(u).split([rank, d_state, d_state], dim=-1)
    dt = F.linear(dt, dt_proj_weight)
    return selective_state_update(
        ssm_state, u, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True
    )


def fused_applies(
    x: Tensor,
    z: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    A: Tensor,
    D: Tensor,
    dt_bias: Tensor,
) -> bool:
    """Whether the Triton kernels take these: CUDA tensors, the model-dtype ones of one kernel
    dtype and the constants fp32, unit-stride rows for x and z, everything else contiguous, a
    conv window as wide as the conv, Triton importable."""
    model_dtype = [z, conv_state, conv_weight, x_proj_weight, dt_proj_weight]
    if conv_bias is not None:
        model_dtype.append(conv_bias)
    constants = (A, D, dt_bias)
    return (
        x.stride(-1) == 1
        and z.stride(-1) == 1
        and all(t.dtype == x.dtype for t in model_dtype)
        and all(t.dtype == torch.float32 for t in constants)
        and all(t.is_contiguous() for t in (*model_dtype[1:], ssm_state, *constants))
        and conv_state.shape[-1] == conv_weight.shape[-1]
        and takes(_MODULE, x)
    )


def ssm_decode(
    x: Tensor,
    z: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    A: Tensor,
    D: Tensor,
    dt_bias: Tensor,
) -> Tensor:
    """One decode step of a Mamba-1 mixer whose TP rank holds every channel (see module)."""
    args = (x, z, conv_state, ssm_state, conv_weight, conv_bias)
    constants = (A, D, dt_bias)
    if fused_applies(*args, x_proj_weight, dt_proj_weight, *constants):
        return _kernels().ssm_decode(*args, x_proj_weight, dt_proj_weight, *constants)
    x_proj = partial(F.linear, weight=x_proj_weight)
    return ssm_decode_unfused(*args, x_proj, dt_proj_weight, *constants)
