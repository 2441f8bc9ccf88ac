"""The Mamba mixer's projections as batched GEMMs between megatron's [s, b, h] and [b, d, s].

The scan and conv kernels want channels-major [b, d, s] tensors (sequence contiguous), while
megatron's stack passes [s, b, h]. Every re-layout between the two is a transposing copy that runs
at a fraction of memory bandwidth (0.29 ms per [32k, 1152] bf16 tensor on an H100, vs 0.23 ms for
the whole out_proj GEMM). None is needed: cuBLAS reads and writes a batch of matrices at any
leading dimension, so both ends of the mixer are single batched GEMMs whose operand or result is
a strided view of the [s, b, h] tensor:

* ``linear_from_sequence_major`` (in_proj): x [s, b, h] -> [b, out, s], as one tensor per block
  of output rows (in_proj's x and z: splitting one output would make autograd concatenate their
  gradients, a copy of the whole [b, 2 d, s]); its backward writes grad(x) straight into an
  [s, b, h] tensor (autograd's would come out [b, h, s] and be copied);
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


def _bmm_into_sequence_major(weight: Tensor, x: Tensor, accumulate: Tensor | None = None) -> Tensor:
    """weight [h, d] times x [b, d, s], written as an [s, b, h] tensor by the GEMM itself (or
    added to ``accumulate``, an [s, b, h] tensor, by the GEMM's epilogue)."""
    weight = weight.unsqueeze(0).expand(x.shape[0], -1, -1)
    if accumulate is not None:
        accumulate.permute(1, 2, 0).baddbmm_(weight, x)
        return accumulate
    out = x.new_empty(x.shape[2], x.shape[0], weight.shape[1])
    torch.bmm(weight, x, out=out.permute(1, 2, 0))
    return out


def _weight_grad(grad_channels_major: Tensor, x_bsi: Tensor, out: Tensor | None = None) -> Tensor:
    """sum_b grad[b] @ x[b] for grad [b, out, s] and x [b, s, in]: grad(weight) [out, in]
    (written into ``out`` when given)."""
    return torch.sum(torch.bmm(grad_channels_major, x_bsi), 0, out=out)


class _FromSequenceMajor(torch.autograd.Function):
    """weight's ``parts`` equal blocks of rows, each applied to x [s, b, h]: one output per
    block."""

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(weight, x)
        ctx.parts = parts
        return tuple(
            channels_major_linear(rows, x.permute(1, 2, 0)) for rows in weight.chunk(parts)
        )

    @staticmethod
    def backward(ctx, *grads: Tensor):
        weight, x = ctx.saved_tensors
        grad_weight = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.empty_like(weight)
            for grad, rows in zip(grads, grad_weight.chunk(ctx.parts)):
                _weight_grad(grad, x.transpose(0, 1), out=rows)
        if ctx.needs_input_grad[1]:
            for grad, rows in zip(grads, weight.chunk(ctx.parts)):
                grad_x = _bmm_into_sequence_major(rows.t(), grad, accumulate=grad_x)
        return grad_weight, grad_x, None


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


def linear_from_sequence_major(weight: Tensor, x: Tensor, parts: int = 1) -> tuple[Tensor, ...]:
    """weight [out, h] applied to x [s, b, h], as ``parts`` tensors [b, out / parts, s] (in_proj's
    x and z), each contiguous; no copy either way. One GEMM per block of weight rows, so that the
    backward sums the blocks' input gradients in the GEMMs instead of concatenating the outputs'."""
    if weight.shape[0] % parts:
        raise ValueError(
            f"linear_from_sequence_major: {weight.shape[0]} output rows do not split into {parts}"
            " equal parts"
        )
    return _FromSequenceMajor.apply(weight, x, parts)


def linear_to_sequence_major(weight: Tensor, y: Tensor) -> Tensor:
    """weight [h, d] applied to y [b, d, s] -> [s, b, h], contiguous (out_proj); no copy either
    way."""
    return _ToSequenceMajor.apply(weight, y)
