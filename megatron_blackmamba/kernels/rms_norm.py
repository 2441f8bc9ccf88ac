"""RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension.

``rms_norm`` runs

* as one Triton kernel forward and one backward (kernels/rms_norm_triton.py) for CUDA tensors
  when Triton imports: the backward writes grad(x) and grad(weight) in one pass over x and dy;
* as torch's ``F.rms_norm`` otherwise (CPU, fp64, or no Triton), the definition the kernels are
  tested against.

Both compute in fp32 (torch in fp64 for fp64 inputs) and round once to x's dtype.

``add_rms_norm`` (inference only) is the residual add and the next layer's norm in one: it adds
a layer's output to the residual stream in place and normalises the stream read in the model's
dtype, one kernel on CUDA where PyTorch runs three (add, cast, norm), each a launch of its own in
a decode step.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_blackmamba.kernels.triton_support import KERNEL_DTYPES, takes, triton_kernels

_MODULE = "rms_norm_triton"
_kernels = partial(triton_kernels, _MODULE)  # the Triton module, or None without Triton


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _kernels().forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = _kernels().backward(rows, weight, dy.reshape(rows.shape).contiguous(), rstd)
        return dx.view(dy.shape), dw, None


def fused_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether the Triton kernels take these: non-empty CUDA tensors of at most fp32 precision, a
    contiguous weight as wide as x's last dimension, and Triton importable."""
    return (
        weight.dtype in KERNEL_DTYPES
        and weight.shape == x.shape[-1:]
        and weight.is_contiguous()
        and takes(_MODULE, x)
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [..., N] with weight [N]; the result in x's dtype."""
    if fused_applies(x, weight):
        return _FusedRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def add_rms_norm(
    delta: Tensor | None, residual: Tensor, weight: Tensor, eps: float, dtype: torch.dtype
) -> Tensor:
    """``residual`` [..., N] += ``delta`` (same shape; None adds nothing) in place, in residual's
    dtype; returns RMSNorm(residual.to(dtype)) with weight [N], in ``dtype``. No autograd."""
    fused = (
        fused_applies(residual, weight)
        and dtype in KERNEL_DTYPES
        and residual.is_contiguous()
        and (delta is None or (delta.shape == residual.shape and delta.is_contiguous()))
    )
    if fused:
        rows = residual.view(-1, residual.shape[-1])  # a view: the add stays in place
        deltas = None if delta is None else delta.view(rows.shape)
        return _kernels().add_forward(deltas, rows, weight, eps, dtype).view(residual.shape)
    if delta is not None:
        residual += delta
    return rms_norm(residual.to(dtype), weight, eps)
