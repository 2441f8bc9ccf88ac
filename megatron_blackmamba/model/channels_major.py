"""The Mamba mixer's projections as batched GEMMs between megatron's [s, b, h] and [b, d, s].

The scan and conv kernels want channels-major [b, d, s] tensors (sequence contiguous), while
megatron's stack passes [s, b, h]. Every re-layout between the two is a transposing copy that runs
at a fraction of memory bandwidth (0.29 ms per [32k, 1152] bf16 tensor on an H100, vs 0.23 ms for
the whole out_proj GEMM). None is needed: cuBLAS reads and writes a batch of matrices at any
leading dimension, so both ends of the mixer are single batched GEMMs whose operand or result is
a strided view of the [s, b, h] tensor:

* ``linear_from_sequence_major`` (in_proj): x [s, b, h] -> [b, out, s]; its backward writes
  grad(x) straight into an [s, b, h] tensor (autograd's would come out [b, h, s] and be copied);
* ``linear_to_sequence_major`` (out_proj): y [b, d, s] -> [s, b, h], written in place by the GEMM;
* ``channels_major_linear`` (x_proj, dt_proj): [b, in, s] -> [b, out, s].

Weight gradients are autograd's for the expanded weight (a batched GEMM, summed over the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor


def channels_major_linear(weight: Tensor, x: Tensor) -> Tensor:
    """weight [out, in] applied to x [b, in, s] -> [b, out, s], contiguous.

    ``x`` may be any view whose [in, s] matrices have a unit stride (the [s, b, h] -> [b, h, s]
    permutation included), so nothing is transposed in memory.
    """
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


def _bmm_into_sequence_major(weight: Tensor, x: Tensor) -> Tensor:
    """weight [h, d] times x [b, d, s], written as an [s, b, h] tensor by the GEMM itself."""
    out = x.new_empty(x.shape[2], x.shape[0], weight.shape[0])
    torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x, out=out.permute(1, 2, 0))
    return out


def _weight_grad(grad_channels_major: Tensor, x_bsi: Tensor) -> Tensor:
    """sum_b grad[b] @ x[b] for grad [b, out, s] and x [b, s, in]: grad(weight) [out, in]."""
    return torch.bmm(grad_channels_major, x_bsi).sum(0)


class _FromSequenceMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(weight, x)
        return channels_major_linear(weight, x.permute(1, 2, 0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, x = ctx.saved_tensors
        grad_weight = _weight_grad(grad, x.transpose(0, 1)) if ctx.needs_input_grad[0] else None
        grad_x = _bmm_into_sequence_major(weight.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_x


class _ToSequenceMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(weight, y)
        return _bmm_into_sequence_major(weight, y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, y = ctx.saved_tensors
        grad = grad.permute(1, 2, 0)  # [b, h, s] view of the [s, b, h] gradient
        grad_weight = _weight_grad(grad, y.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_y = channels_major_linear(weight.t(), grad) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_y


def linear_from_sequence_major(weight: Tensor, x: Tensor) -> Tensor:
    """weight [out, h] applied to x [s, b, h] -> [b, out, s] (in_proj); no copy either way."""
    return _FromSequenceMajor.apply(weight, x)


def linear_to_sequence_major(weight: Tensor, y: Tensor) -> Tensor:
    """weight [h, d] applied to y [b, d, s] -> [s, b, h], contiguous (out_proj); no copy either way."""
    return _ToSequenceMajor.apply(weight, y)
