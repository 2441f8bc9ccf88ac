"""The experts' gated activation times the routing probability, one Triton kernel each way.

Why: megatron's GroupedMLP runs ``act(x1) * x2 * probs`` through torch.compile, whose backward
took 1.05 ms at 32k tokens x 6144 (BlackMamba-340M on an H100) where its bytes need 0.34 ms
(bench/PERF_NOTES.md). Here the forward reads x once and writes y; the backward reads
x and dy once, writes dx, and reduces d(probs) over each row in the same pass. Everything is
computed in fp32 and rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act_and_grad(a, SILU: tl.constexpr):
    """(act(a), act'(a)) in fp32: SiLU, or the exact (erf) GELU of F.gelu."""
    if SILU:
        s = tl.sigmoid(a)
        act = a * s
        grad = s * (1.0 + a * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.erf(a * _SQRT1_2))
        act = a * cdf
        grad = cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return act, grad


@triton.jit
def _glu_fwd(
    x_ptr, p_ptr, y_ptr, T, F, SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """x [T, 2F], p [T] -> y [T, F] = act(x[:, :F]) * x[:, F:] * p."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < T)[:, None] & (cols < F)[None, :]
    x_row = x_ptr + rows[:, None] * (2 * F) + cols[None, :]
    a = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_row + F, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows, mask=rows < T, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(a, SILU)
    y = act * b * p[:, None]
    tl.store(y_ptr + rows[:, None] * F + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(
    x_ptr,
    p_ptr,
    dy_ptr,
    dx_ptr,
    dp_ptr,
    T,
    F,
    SILU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx [T, 2F] and dp [T] (fp32) for y = act(a) * b * p; one program sweeps BLOCK_M whole
    rows."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < T
    p = tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dp = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, F, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < F)[None, :]
        x_row = x_ptr + rows[:, None] * (2 * F) + cols[None, :]
        a = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_row + F, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * F + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        act, dact = _act_and_grad(a, SILU)
        dp += tl.sum(dy * act * b, axis=1)
        dyp = dy * p[:, None]
        dx_row = dx_ptr + rows[:, None] * (2 * F) + cols[None, :]
        tl.store(dx_row, (dyp * b * dact).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_row + F, (dyp * act).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dp_ptr + rows, dp, mask=row_ok)


def forward(x: torch.Tensor, probs: torch.Tensor, silu: bool) -> torch.Tensor:
    """x [T, 2F] contiguous, probs [T] contiguous -> y [T, F] in x's dtype."""
    T, F = x.shape[0], x.shape[1] // 2
    y = torch.empty(T, F, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(T, 4), triton.cdiv(F, 1024))  # tiles: the fastest of 8 tried on an H100
    _glu_fwd[grid](x, probs, y, T, F, SILU=silu, BLOCK_M=4, BLOCK_N=1024, num_warps=8)
    return y


def backward(
    x: torch.Tensor, probs: torch.Tensor, dy: torch.Tensor, silu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [T, 2F] in x's dtype, dprobs [T] fp32) for ``forward``'s inputs and dy [T, F]
    contiguous."""
    T, F = x.shape[0], x.shape[1] // 2
    dx = torch.empty_like(x)
    dp = torch.empty(T, dtype=torch.float32, device=x.device)
    _glu_bwd[(T,)](x, probs, dy, dx, dp, T, F, SILU=silu, BLOCK_M=1, BLOCK_N=1024, num_warps=4)
    return dx, dp
