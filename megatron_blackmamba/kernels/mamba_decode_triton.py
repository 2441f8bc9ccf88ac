"""Triton kernels of one Mamba-1 decode step between in_proj and out_proj (kernels/mamba_decode).

Two kernels, because x_proj reduces over every channel of the conv output before any channel's
state can advance:

* ``_conv_x_proj``: each program owns a block of channels and of sequences: the conv window
  shifted in place, u = silu(conv + bias) rounded to the model dtype, and the block's share of
  x_proj (u @ W_x^T over its channels) as fp32 partial sums [splits, b, R + 2N];
* ``_dt_state_update``: each program owns a block of channels of one sequence: the partials
  summed in a fixed order (deterministic) and rounded as F.linear rounds x_proj's output, dt_proj
  on its channels (rounded again), softplus(dt + bias), the state advanced in place, the output
  C h + D u gated by silu(z).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_B = 16  # sequences per program of the conv kernel (tl.dot's smallest M)


@triton.jit
def _conv_x_proj(
    x_ptr,
    stride_x,
    conv_ptr,
    cw_ptr,
    cb_ptr,
    u_ptr,
    wx_ptr,
    part_ptr,
    batch,
    dim,
    J,
    W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """conv [b, d, W] <- [conv[..., 1:], x]; u [b, d] = silu(sum_w conv * cw + cb) in x's dtype;
    part[split, b, j] = sum over this program's channels c of u[b, c] * wx[j, c] (fp32)."""
    split = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = split * BLOCK_D + tl.arange(0, BLOCK_D)
    w = tl.arange(0, BLOCK_W)
    b_ok, c_ok = b < batch, c < dim
    bc_ok = b_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + b[:, None] * stride_x + c[None, :], mask=bc_ok, other=0.0)
    # conv [b, c, w] as a [BLOCK_B, BLOCK_D, BLOCK_W] block: the window after the shift.
    row = (b[:, None, None] * dim + c[None, :, None]) * W
    bcw_ok = bc_ok[:, :, None] & (w[None, None, :] < W)
    kept = tl.load(conv_ptr + row + w[None, None, :] + 1, mask=bcw_ok & (w < W - 1), other=0.0)
    window = tl.where(w[None, None, :] == W - 1, x[:, :, None], kept)
    tl.store(conv_ptr + row + w[None, None, :], window, mask=bcw_ok)
    weight = tl.load(cw_ptr + c[:, None] * W + w[None, :], mask=c_ok[:, None] & (w < W), other=0.0)
    acc = tl.sum(window.to(tl.float32) * weight.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(cb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    u = (acc * tl.sigmoid(acc)).to(x.dtype)
    tl.store(u_ptr + b[:, None] * dim + c[None, :], u, mask=bc_ok)
    j = tl.arange(0, BLOCK_J)
    wx = tl.load(wx_ptr + j[None, :] * dim + c[:, None], mask=c_ok[:, None] & (j < J), other=0.0)
    part = tl.dot(u, wx, input_precision=PRECISION)
    part_ok = b_ok[:, None] & (j < J)[None, :]
    tl.store(part_ptr + (split * batch + b[:, None]) * J + j[None, :], part, mask=part_ok)


@triton.jit
def _log1p(e):
    """log(1 + e) accurate for small e (Goldberg): log(1 + e) alone loses e's low bits, which
    matters for the small dt of the typical dt_bias."""
    one_e = 1.0 + e
    return tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))


@triton.jit
def _x_proj_slice(
    part_ptr, b, batch, J, splits, offset, n, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr
):
    """x_proj's outputs offset..offset+n of sequence b: the splits' partials [splits, n] loaded
    at once and summed (a fixed reduction tree: deterministic)."""
    s = tl.arange(0, BLOCK_S)
    i = tl.arange(0, BLOCK)
    ok = (s < splits)[:, None] & (i < n)[None, :]
    part = tl.load(
        part_ptr + (s[:, None] * batch + b) * J + offset + i[None, :], mask=ok, other=0.0
    )
    return tl.sum(part, axis=0)


@triton.jit
def _dt_state_update(
    u_ptr,
    z_ptr,
    stride_z,
    part_ptr,
    wdt_ptr,
    dt_bias_ptr,
    A_ptr,
    D_ptr,
    ssm_ptr,
    y_ptr,
    batch,
    dim,
    J,
    splits,
    R,
    N,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dt = softplus(round(round(x_dbl[:R]) @ wdt^T) + dt_bias); h = exp(dt A) h + dt u B;
    y = (h C + D u) * silu(z), for this program's channels of sequence b."""
    b = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    n = tl.arange(0, BLOCK_N)
    c_ok, r_ok, n_ok = c < dim, r < R, n < N
    dtype = u_ptr.dtype.element_ty
    dt_low = _x_proj_slice(part_ptr, b, batch, J, splits, 0, R, BLOCK_S, BLOCK_R).to(dtype)
    B = (
        _x_proj_slice(part_ptr, b, batch, J, splits, R, N, BLOCK_S, BLOCK_N)
        .to(dtype)
        .to(tl.float32)
    )
    C = (
        _x_proj_slice(part_ptr, b, batch, J, splits, R + N, N, BLOCK_S, BLOCK_N)
        .to(dtype)
        .to(tl.float32)
    )
    wdt = tl.load(wdt_ptr + c[:, None] * R + r[None, :], mask=c_ok[:, None] & r_ok, other=0.0)
    dt = tl.sum(wdt.to(tl.float32) * dt_low.to(tl.float32)[None, :], axis=1).to(dtype)
    dt = dt.to(tl.float32) + tl.load(dt_bias_ptr + c, mask=c_ok, other=0.0)
    dt = tl.where(dt <= 20.0, _log1p(tl.exp(dt)), dt)  # softplus, identity above 20 as F.softplus
    u = tl.load(u_ptr + b * dim + c, mask=c_ok, other=0.0).to(tl.float32)
    cn = c[:, None] * N + n[None, :]
    cn_ok = c_ok[:, None] & n_ok[None, :]
    A = tl.load(A_ptr + cn, mask=cn_ok, other=0.0)
    h_ptr = ssm_ptr + b * dim * N + cn
    h = tl.load(h_ptr, mask=cn_ok, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
    tl.store(h_ptr, h.to(ssm_ptr.dtype.element_ty), mask=cn_ok)
    y = tl.sum(h * C[None, :], axis=1) + u * tl.load(D_ptr + c, mask=c_ok, other=0.0)
    z = tl.load(z_ptr + b * stride_z + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * dim + c, (y * z * tl.sigmoid(z)).to(dtype), mask=c_ok)


def ssm_decode(
    x: Tensor,
    z: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    x_proj_weight: Tensor,
    dt_proj_weight: Tensor,
    A: Tensor,
    D: Tensor,
    dt_bias: Tensor,
    block_d: int = 64,
    block_c: int = 128,
) -> Tensor:
    """See kernels/mamba_decode.ssm_decode; x, z may be row-strided views of in_proj's output.
    ``block_d``: channels per program of the conv kernel (their count is the number of x_proj
    partial sums); ``block_c``: channels per program of the state update."""
    batch, dim = x.shape
    width = conv_weight.shape[1]
    rank, d_state = dt_proj_weight.shape[1], A.shape[1]
    outputs = x_proj_weight.shape[0]
    splits = triton.cdiv(dim, block_d)
    u = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    partials = torch.empty(splits, batch, outputs, dtype=torch.float32, device=x.device)
    _conv_x_proj[(splits, triton.cdiv(batch, BLOCK_B))](
        x,
        x.stride(0),
        conv_state,
        conv_weight,
        x if conv_bias is None else conv_bias,
        u,
        x_proj_weight,
        partials,
        batch,
        dim,
        outputs,
        W=width,
        HAS_BIAS=conv_bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_B=BLOCK_B,
        BLOCK_D=block_d,
        BLOCK_W=triton.next_power_of_2(width),
        BLOCK_J=max(16, triton.next_power_of_2(outputs)),
    )
    y = torch.empty_like(u)
    _dt_state_update[(triton.cdiv(dim, block_c), batch)](
        u,
        z,
        z.stride(0),
        partials,
        dt_proj_weight,
        dt_bias,
        A,
        D,
        ssm_state,
        y,
        batch,
        dim,
        outputs,
        splits,
        rank,
        d_state,
        BLOCK_C=block_c,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_N=max(2, triton.next_power_of_2(d_state)),
    )
    return y
