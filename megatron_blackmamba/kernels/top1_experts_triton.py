"""kernels/top1_experts on CUDA: the route and the two expert GEMMs as Triton kernels, each program
reading the expert index on the device.

``route``: one program computes every token's fp32 router logits (``tl.dot`` of the operands,
fp32 sums), its sigmoid gate, the top expert, and adds the tokens per expert into the load
counts (one program: no atomics, so the counts are exact and deterministic).

``fc1`` and ``fc2``: one program per (output slice, expert; and reduction split). A program whose
expert no token chose returns at once; the others multiply that expert's tokens (the rest masked
to zero) with their slice of its weights, streaming the weights once through ``tl.dot`` (16-row
minimum, so a single token wastes compute, not bandwidth). fc1 rounds its product to the operand
dtype before the activation, as the grouped GEMM does, and applies ``act * value * p`` in fp32
(kernels/glu_triton's activation). fc2's reduction can be split over programs
(``Tiles.splits``), for one token whose 36 output slices of 32 would leave most of the 132 SMs
idle: the splits store fp32 partial sums that ``_sum_splits`` adds in a fixed order, so the
result does not depend on scheduling.
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
    """One kernel's launch shape: outputs per program, the reduction step, warps, the
    software-pipeline depth (loads in flight are what a memory-bound GEMV needs) and, for fc2,
    the number of programs each output's reduction is split over."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 1

    def launch_options(self) -> dict[str, int]:
        """The tile sizes and launch settings both GEMM kernels take."""
        return dict(
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


def tiles_for(tokens: int, element_size: int) -> tuple[Tiles, Tiles]:
    """(fc1, fc2) launch shapes for ``tokens`` tokens of ``element_size``-byte operands.

    16-bit: the fastest measured at 1, 8 and 64 tokens on an H200 (bench/top1_experts_check.py,
    bench/results/h200_decode_moe.md). One token reads one expert, so narrow slices and fc2's
    split reduction spread it over the SMs (fc1's split did not pay: its partial sums must be
    added before the activation); more tokens read more experts, and wider slices stream them
    faster. fp32 operands double each tile's bytes, and with the wide shapes failed on the GPU
    (shared memory, most likely), so fp32 (the tests' precision, not decode's) keeps the narrow
    shapes checked there."""
    if element_size > 2:
        return Tiles(32, 128), Tiles(16, 128)
    if tokens == 1:
        return Tiles(32, 128, 4, 4), Tiles(64, 128, 4, 3, splits=4)
    # A 64-row token block leaves shared memory for only three stages of fc2's tiles.
    return Tiles(64, 128, 4, 4), Tiles(64, 256, 4, 4) if tokens <= 16 else Tiles(64, 256, 8, 3)


@triton.jit
def _route(
    x_ptr,
    w_ptr,
    b_ptr,
    expert_ptr,
    gate_ptr,
    counts_ptr,
    T,
    H,
    E,
    HAS_BIAS: tl.constexpr,
    COUNT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """logits = x [T, H] @ w [E, H]^T (+ b) in fp32; gate, expert = max over e of sigmoid(logits)
    (the lowest expert among equal gates); counts[e] += the tokens that chose e."""
    t = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok, e_ok = t < T, e < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        x_mask = t_ok[:, None] & k_ok[None, :]
        xk = tl.load(x_ptr + t[:, None] * H + k[None, :], mask=x_mask, other=0.0)
        w_mask = k_ok[:, None] & e_ok[None, :]
        wk = tl.load(w_ptr + e[None, :] * H + k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(xk, wk, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    gate = tl.where(e_ok[None, :], tl.sigmoid(acc), -1.0)
    best = tl.max(gate, axis=1)
    expert = tl.min(tl.where(gate == best[:, None], e[None, :], BLOCK_E), axis=1)
    tl.store(expert_ptr + t, expert.to(tl.int64), mask=t_ok)
    tl.store(gate_ptr + t, best, mask=t_ok)
    if COUNT:
        chose = (expert[:, None] == e[None, :]) & t_ok[:, None]
        counts = tl.load(counts_ptr + e, mask=e_ok, other=0.0)
        tl.store(counts_ptr + e, counts + tl.sum(chose.to(tl.float64), axis=0), mask=e_ok)


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
    out_ptr,
    T,
    F,
    H,
    k_per_split,
    PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[t, n] = h[t] @ w2[e][:, n] for expert[t] == e; split (SPLITS > 1): out[s, t, n] = that
    product over split s's slice of F, fp32."""
    e = tl.program_id(2)
    t, mine = _tokens_of(expert_ptr, T, e, BLOCK_T)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < H
        w = w_ptr + e.to(tl.int64) * F * H
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        k_first = tl.program_id(1) * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):  # a multiple of BLOCK_K
            k = k_first + k0 + tl.arange(0, BLOCK_K)
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
        mask = mine[:, None] & n_ok[None, :]
        if SPLITS == 1:
            tl.store(out_ptr + t[:, None] * H + n[None, :], acc.to(out_ptr.dtype.element_ty), mask)
        else:
            tl.store(out_ptr + (tl.program_id(1) * T + t[:, None]) * H + n[None, :], acc, mask)


@triton.jit
def _sum_splits(part_ptr, y_ptr, M, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y [M] = sum over s of part [SPLITS, M] (fp32, in order s = 0, 1, ...), rounded once."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * M + i, mask=ok, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _launch_shape(tokens: int, dtype: torch.dtype) -> tuple[int, str]:
    """(token block, dot precision): one block of >= 16 rows (``tl.dot``'s minimum); fp32
    operands multiply in full precision ("tf32" is ignored for 16-bit ones)."""
    return max(16, triton.next_power_of_2(tokens)), "ieee" if dtype == torch.float32 else "tf32"


def _k_per_split(k: int, splits: int, block_k: int) -> int:
    """Each split's share of a k-long reduction, whole BLOCK_K steps."""
    return triton.cdiv(triton.cdiv(k, splits), block_k) * block_k


def route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    counts: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x [T, H], weight [E, H] of x's dtype, bias [E] or None, counts [E] fp64 or None ->
    (expert [T] int64, gate [T] fp32); counts (when given) gains each expert's tokens."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    expert = torch.empty(tokens, dtype=torch.int64, device=x.device)
    gate = torch.empty(tokens, dtype=torch.float32, device=x.device)
    block_t, precision = _launch_shape(tokens, x.dtype)
    _route[(1,)](
        x,
        weight,
        x if bias is None else bias,
        expert,
        gate,
        gate if counts is None else counts,
        tokens,
        hidden,
        experts,
        HAS_BIAS=bias is not None,
        COUNT=counts is not None,
        PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_E=max(16, triton.next_power_of_2(experts)),
        BLOCK_K=128,
    )
    return expert, gate


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
    block_t, precision = _launch_shape(tokens, x.dtype)
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
        **tiles.launch_options(),
    )
    return h


def fc2(h: Tensor, expert: Tensor, w2: Tensor, tiles: Tiles | None = None) -> Tensor:
    """h [T, F], expert [T] int64, w2 [E, F, H] -> y [T, H] in h's dtype."""
    tokens, width = h.shape
    tiles = tiles or tiles_for(tokens, h.element_size())[1]
    experts, hidden = w2.shape[0], w2.shape[2]
    block_t, precision = _launch_shape(tokens, h.dtype)
    y = torch.empty(tokens, hidden, dtype=h.dtype, device=h.device)
    split = tiles.splits > 1
    out = (
        torch.empty(tiles.splits, tokens, hidden, dtype=torch.float32, device=h.device)
        if split
        else y
    )
    _fc2[(triton.cdiv(hidden, tiles.block_n), tiles.splits, experts)](
        h,
        expert,
        w2,
        out,
        tokens,
        width,
        hidden,
        _k_per_split(width, tiles.splits, tiles.block_k),
        PRECISION=precision,
        SPLITS=tiles.splits,
        BLOCK_T=block_t,
        **tiles.launch_options(),
    )
    if split:
        block = 1024
        _sum_splits[(triton.cdiv(y.numel(), block),)](
            out, y, y.numel(), SPLITS=tiles.splits, BLOCK=block
        )
    return y


def top1_expert_mlp(
    x: Tensor, expert: Tensor, p: Tensor, w1: Tensor, w2: Tensor, silu: bool, gated: bool
) -> Tensor:
    """x [T, H], expert [T] int64, p [T] fp32, w1 [E, H, F1], w2 [E, F, H], all contiguous ->
    y [T, H] in x's dtype."""
    return fc2(fc1(x, expert, p, w1, silu, gated), expert, w2)
