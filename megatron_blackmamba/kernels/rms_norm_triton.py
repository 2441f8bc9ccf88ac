"""RMSNorm as one Triton kernel each way; the backward makes one pass for grad(x) and grad(weight).
Without autograd, one more kernel adds a layer's output to the residual stream before the norm.

Why: torch's fused RMSNorm backward runs two kernels, one for grad(x) and one for grad(weight)
that reads x and dy again: 0.27 ms forward+backward per [32k, 1152] bf16 norm on an H100, 30 norms
per BlackMamba-340M micro-batch, where the bytes need 0.11 ms (bench/PERF_NOTES.md).
Here each backward program sweeps its own block of rows once, writes grad(x), and leaves its fp32
partial sum of grad(weight) in its own row of a [programs, N] buffer; the wrapper adds those rows
in a fixed order, so the result is deterministic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _normalize_into(x, w_ptr, y_ptr, cols, offsets, mask, N, eps):
    """y[offsets] = x * rstd * w in y's dtype for fp32 rows x [BLOCK_M, BLOCK_N]; returns rstd."""
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(
        y_ptr + offsets, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask
    )
    return rstd


@triton.jit
def _rms_fwd(
    x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """y = x * rstd * w for BLOCK_M rows of x [M, N]; rstd [M] fp32 saved for the backward."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = _normalize_into(x, w_ptr, y_ptr, cols, offsets, mask, N, eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _add_rms_fwd(
    d_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """r += d in fp32, stored in r's dtype (the residual stream), for BLOCK_M rows of [M, N];
    y = RMSNorm of r read in y's dtype (the model's), times w."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + offsets, mask=mask, other=0.0)
        r = (r.to(tl.float32) + d.to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + offsets, r, mask=mask)
    _normalize_into(
        r.to(y_ptr.dtype.element_ty).to(tl.float32), w_ptr, y_ptr, cols, offsets, mask, N, eps
    )


@triton.jit
def _rms_bwd(
    x_ptr,
    w_ptr,
    dy_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    M,
    N,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """grad(x) for rows [pid * rows_per_program, ...) and their grad(weight) sum into
    dw_ptr[pid]."""
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (start + tl.arange(0, BLOCK_M) < rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / N)[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(dw_ptr + tl.program_id(0) * N + cols, dw, mask=col_ok)


def _block_m(n: int) -> int:
    """Rows per tile: about 4k elements in flight per program."""
    return max(1, min(16, 4096 // triton.next_power_of_2(n)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] contiguous -> (y [M, N] in x's dtype, rstd [M] fp32)."""
    M, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_m = _block_m(N)
    _rms_fwd[(triton.cdiv(M, block_m),)](
        x,
        weight,
        y,
        rstd,
        M,
        N,
        eps,
        BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(N),
        num_warps=4,
    )
    return y, rstd


def add_forward(
    delta: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """residual [M, N] += delta [M, N] (None: nothing added) in place, then y [M, N] in ``dtype``:
    RMSNorm of the residual read in ``dtype``. Contiguous operands; no backward."""
    M, N = residual.shape
    y = torch.empty(M, N, dtype=dtype, device=residual.device)
    block_m = _block_m(N)
    _add_rms_fwd[(triton.cdiv(M, block_m),)](
        residual if delta is None else delta,
        residual,
        weight,
        y,
        M,
        N,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(N),
        num_warps=4,
    )
    return y


def backward(
    x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x in x's dtype, grad weight in weight's dtype) for ``forward``'s x, dy [M, N]
    contiguous."""
    M, N = x.shape
    dx = torch.empty_like(x)
    programs = max(1, min(M, 8 * _sm_count(x.device)))
    rows_per_program = triton.cdiv(M, programs)
    partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    _rms_bwd[(programs,)](
        x,
        weight,
        dy,
        rstd,
        dx,
        partial,
        M,
        N,
        rows_per_program,
        BLOCK_M=_block_m(N),
        BLOCK_N=triton.next_power_of_2(N),
        num_warps=8,
    )
    return dx, partial.sum(0).to(weight.dtype)
