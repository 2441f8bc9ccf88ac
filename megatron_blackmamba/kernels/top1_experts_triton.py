"""kernels/top1_experts.top1_expert_mlp on CUDA: two Triton kernels, one program per (output slice,
expert).

Each program loads the expert index of every token of the call (at most MAX_TOKENS, one block),
and does nothing unless some token chose its expert; otherwise it multiplies the tokens of that
expert (the others masked to zero) with its slice of that expert's weights, streaming the weights
once through ``tl.dot`` (16-row minimum, so a single token wastes compute, not bandwidth), and
stores only its own tokens' rows. Every token has exactly one expert, so every output row is
written once. fc1 rounds its product to the operand dtype before the activation, as the grouped
GEMM does, and applies act * value * p in fp32 (kernels/glu_triton's activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_blackmamba.kernels.glu_triton import _act_and_grad


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: outputs per program, the reduction step, warps and the
    software-pipeline depth (loads in flight are what a memory-bound GEMV needs)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def tiles_for(tokens: int, element_size: int) -> tuple[Tiles, Tiles]:
    """(fc1, fc2) launch shapes for ``tokens`` tokens of ``element_size``-byte operands.

    16-bit: the fastest of 36 measured at 1, 8 and 64 tokens on an H200
    (bench/top1_experts_check.py, bench/results/h200_decode_moe.md). One token reads one expert,
    so narrow slices spread it over more programs; more tokens read more experts, and wider
    slices stream them faster. fp32 operands double each tile's bytes, and with the wide shapes
    failed on the GPU (shared memory, most likely), so fp32 (the tests' precision, not decode's)
    keeps the narrow shapes checked there."""
    if element_size > 2:
        return Tiles(32, 128), Tiles(16, 128)
    if tokens == 1:
        return Tiles(32, 128), Tiles(32, 512)
    # A 64-row token block leaves shared memory for only three stages of fc2's tiles.
    return Tiles(64, 128, 4, 4), Tiles(64, 256, 4, 4) if tokens <= 16 else Tiles(64, 256, 8, 3)


@triton.jit
def _tokens_of(expert_ptr, T, e, BLOCK_T: tl.constexpr):
    t = tl.arange(0, BLOCK_T)
    mine = tl.load(expert_ptr + t, mask=t < T, other=-1) == e
    return t.to(tl.int64), mine


@triton.jit
def _fc1(
    x_ptr,
    expert_ptr,
    p_ptr,
    w_ptr,
    h_ptr,
    T,
    H,
    F,
    SILU: tl.constexpr,
    GATED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[t, n] = act(x[t] @ w1[e][:, n]) (* x[t] @ w1[e][:, F + n] if GATED) * p[t] for
    expert[t] == e."""
    e = tl.program_id(1)
    t, mine = _tokens_of(expert_ptr, T, e, BLOCK_T)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < F
        width = 2 * F if GATED else F
        w = w_ptr + e.to(tl.int64) * H * width
        acc_a = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < H
            xk = tl.load(
                x_ptr + t[:, None] * H + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0
            )
            w_mask = k_ok[:, None] & n_ok[None, :]
            w_tile = w + k[:, None].to(tl.int64) * width + n[None, :]
            acc_a = tl.dot(
                xk, tl.load(w_tile, mask=w_mask, other=0.0), acc_a, input_precision=PRECISION
            )
            if GATED:
                wb = tl.load(w_tile + F, mask=w_mask, other=0.0)
                acc_b = tl.dot(xk, wb, acc_b, input_precision=PRECISION)
        dtype = h_ptr.dtype.element_ty
        act, _ = _act_and_grad(acc_a.to(dtype).to(tl.float32), SILU)
        if GATED:
            act = act * acc_b.to(dtype).to(tl.float32)
        p = tl.load(p_ptr + t, mask=mine, other=0.0)
        out = (act * p[:, None]).to(dtype)
        tl.store(h_ptr + t[:, None] * F + n[None, :], out, mask=mine[:, None] & n_ok[None, :])


@triton.jit
def _fc2(
    h_ptr,
    expert_ptr,
    w_ptr,
    y_ptr,
    T,
    F,
    H,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[t, n] = h[t] @ w2[e][:, n] for expert[t] == e."""
    e = tl.program_id(1)
    t, mine = _tokens_of(expert_ptr, T, e, BLOCK_T)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < H
        w = w_ptr + e.to(tl.int64) * F * H
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < F
            hk = tl.load(
                h_ptr + t[:, None] * F + k[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0
            )
            wk = tl.load(
                w + k[:, None].to(tl.int64) * H + n[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
        out = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t[:, None] * H + n[None, :], out, mask=mine[:, None] & n_ok[None, :])


def _launch_shape(x: Tensor) -> tuple[int, str]:
    """(token block, dot precision): one block of >= 16 rows (``tl.dot``'s minimum); fp32
    operands multiply in full precision ("tf32" is ignored for 16-bit ones)."""
    block_t = max(16, triton.next_power_of_2(x.shape[0]))
    return block_t, "ieee" if x.dtype == torch.float32 else "tf32"


def fc1(
    x: Tensor,
    expert: Tensor,
    p: Tensor,
    w1: Tensor,
    silu: bool,
    gated: bool,
    tiles: Tiles | None = None,
) -> Tensor:
    """x [T, H], expert [T] int64, p [T] fp32, w1 [E, H, F1] -> h [T, F] in x's dtype."""
    tokens, hidden = x.shape
    tiles = tiles or tiles_for(tokens, x.element_size())[0]
    experts, width = w1.shape[0], w1.shape[2] // (2 if gated else 1)
    block_t, precision = _launch_shape(x)
    h = torch.empty(tokens, width, dtype=x.dtype, device=x.device)
    _fc1[(triton.cdiv(width, tiles.block_n), experts)](
        x,
        expert,
        p,
        w1,
        h,
        tokens,
        hidden,
        width,
        SILU=silu,
        GATED=gated,
        PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return h


def fc2(h: Tensor, expert: Tensor, w2: Tensor, tiles: Tiles | None = None) -> Tensor:
    """h [T, F], expert [T] int64, w2 [E, F, H] -> y [T, H] in h's dtype."""
    tokens, width = h.shape
    tiles = tiles or tiles_for(tokens, h.element_size())[1]
    experts, hidden = w2.shape[0], w2.shape[2]
    block_t, precision = _launch_shape(h)
    y = torch.empty(tokens, hidden, dtype=h.dtype, device=h.device)
    _fc2[(triton.cdiv(hidden, tiles.block_n), experts)](
        h,
        expert,
        w2,
        y,
        tokens,
        width,
        hidden,
        PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return y


def top1_expert_mlp(
    x: Tensor, expert: Tensor, p: Tensor, w1: Tensor, w2: Tensor, silu: bool, gated: bool
) -> Tensor:
    """x [T, H], expert [T] int64, p [T] fp32, w1 [E, H, F1], w2 [E, F, H], all contiguous ->
    y [T, H] in x's dtype."""
    return fc2(fc1(x, expert, p, w1, silu, gated), expert, w2)
