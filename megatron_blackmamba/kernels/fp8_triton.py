"""Quantising a GEMM operand to fp8 (e4m3) in one pass: kernels/fp8.quantize_rows on CUDA.

The PyTorch expression reads the operand three times and writes fp32 intermediates; before a
GEMM that fp8 makes only 1.3-1.45x faster (bench/results/h200_fp8_experts.md), that would cost
more than it saves. Here each program loads whole rows once, reduces their absolute maximum in
registers and stores the e4m3 values and the fp32 scale (rowwise). Tensorwise first reduces the
whole tensor's maximum on the device (``vector_norm(x, inf)``, one read) and the kernel reads it
from memory: nothing goes to the host. The arithmetic is the PyTorch path's (fp32, round to
nearest even, saturate at +-448), so the results are bit-identical (tests/kernels/test_fp8.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_blackmamba.kernels.fp8 import _TINY_AMAX, FP8, FP8_MAX

_MAX_ROW = 16384  # widest row held in registers (BlackMamba's widest operand row: 6144)


@triton.jit
def _quantize_rows(
    x_ptr,
    q_ptr,
    scale_ptr,
    amax_ptr,
    M,
    K,
    stride_xm,
    ROWWISE: tl.constexpr,
    FP8_MAX_: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if ROWWISE:
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(amax_ptr).to(tl.float32)
    amax = tl.maximum(amax, TINY)
    q = x * tl.div_rn(FP8_MAX_ + tl.zeros_like(amax), amax)[:, None]
    q = tl.minimum(tl.maximum(q, -FP8_MAX_), FP8_MAX_)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, tl.div_rn(amax, FP8_MAX_ + tl.zeros_like(amax)), mask=row_ok)


def applies(x: Tensor) -> bool:
    """A non-empty CUDA matrix of 16-bit or fp32 values with contiguous rows that fit a program."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.numel() > 0
        and x.stride(1) == 1
        and x.shape[1] <= _MAX_ROW
    )


def quantize_rows(
    x: Tensor, rowwise: bool, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x8 [M, K] e4m3 contiguous, scale [M] fp32), written into ``out`` if given."""
    m, k = x.shape
    if out is None:
        out = (
            torch.empty(m, k, dtype=FP8, device=x.device),
            torch.empty(m, dtype=torch.float32, device=x.device),
        )
    q, scale = out
    amax = scale if rowwise else torch.linalg.vector_norm(x, float("inf")).float().reshape(1)
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(16, 4096 // block_k))
    _quantize_rows[(triton.cdiv(m, block_m),)](
        x,
        q,
        scale,
        amax,
        m,
        k,
        x.stride(0),
        ROWWISE=rowwise,
        FP8_MAX_=FP8_MAX,
        TINY=_TINY_AMAX,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=4 if block_k <= 2048 else 8,
    )
    return q, scale
