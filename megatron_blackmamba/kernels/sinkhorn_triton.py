"""The Sinkhorn loop as a fixed sequence of Triton launches, for the router on GPUs.

Why: the torch loop (model/sinkhorn.py) is ~19 small kernels per iteration, always max_iters
iterations; replayed from a CUDA graph its ~380 nodes still cost more to launch than to run. A
single-program kernel, tried first, fixed the launches but swept the (T, E) cost matrix from one
SM: 0.29 ms for 6 iterations at T = 32k on an H100, latency-bound. This sequence takes 0.057 ms
(graph replay; bench/results/h100_session5_experiments.md).

Here each iteration is one launch of ``PROGRAMS`` programs, each owning a contiguous slice of the
tokens: it updates its rows' d0, their largest marginal error and its partial column sums, and
stores them in its own slot. The next launch reads all slots (a fixed-order sum: deterministic,
no atomics), so the column scaling needs no grid-wide barrier. The stopping test runs at the
start of the following launch: once an iteration's error is < tol (or the cap is reached), that
launch writes the result and raises a flag on which every later launch returns at once. There
are always max_iters + 2 launches, so the sequence has fixed shape and is captured into the
router's CUDA graph (model/sinkhorn.sinkhorn_replayed), with no host sync.

Same iterates and stopping rule as ``model.sinkhorn.sinkhorn``; sums run in a different order, so
the plan agrees to fp32 rounding rather than bit for bit (tests/model/test_sinkhorn.py compares
both with the float64 reference on GPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TINY = float(torch.finfo(torch.float32).tiny)
PROGRAMS = 128  # token slices per launch: 256 rows each at T = 32k


@triton.jit
def _row_slice(T, P: tl.constexpr):
    """[lo, hi): the contiguous token rows this program owns (empty for the last ones when T <
    P)."""
    rows_per = tl.cdiv(T, P)
    start = tl.program_id(0) * rows_per
    return start, tl.minimum(start + rows_per, T)


@triton.jit
def _sinkhorn_start(
    cost_ptr,
    d1_ptr,
    d0_ptr,
    col_ptr,
    flag_ptr,
    T,
    tiny,
    E: tl.constexpr,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """d0_0 = row scaling for the initial d1 into d0[0]; this slice's column sums into col[0,
    pid]."""
    cols = tl.arange(0, E)
    d1 = tl.load(d1_ptr + cols)
    lo, hi = _row_slice(T, P)
    colsum = tl.zeros([E], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        valid = rows < hi
        c = tl.load(cost_ptr + rows[:, None] * E + cols[None, :], mask=valid[:, None], other=0.0)
        d0 = (1.0 / T) / (tl.sum(c * d1[None, :], axis=1) + tiny)
        tl.store(d0_ptr + rows, d0, mask=valid)
        colsum += tl.sum(tl.where(valid[:, None], c * d0[:, None], 0.0), axis=0)
    tl.store(col_ptr + tl.program_id(0) * E + cols, colsum)
    if tl.program_id(0) == 0:
        tl.store(flag_ptr, 0)


@triton.jit(do_not_specialize=["k"])  # one compile for every launch index
def _sinkhorn_iteration(
    cost_ptr,
    d1_ptr,
    d0_ptr,
    col_ptr,
    err_ptr,
    flag_ptr,
    out_ptr,
    T,
    tol,
    max_iters,
    k,
    tiny,
    E: tl.constexpr,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Launch k >= 1: stop on iteration k - 1's error, else run iteration k.

    Buffers alternate by parity: iteration k reads d0[(k-1) % 2] and col[(k-1) % 2] (the column
    sums of d0_k, written by launch k - 1), writes d0[k % 2], col[k % 2, pid] and err[k % 2, pid].
    out [3] fp32: (iterations, row error, which d0 row is final); d1 [E]: final column scaling.
    """
    cols = tl.arange(0, E)
    slots = tl.arange(0, P)
    prev, cur = (k + 1) % 2, k % 2
    running = tl.load(flag_ptr) == 0
    err_prev = tl.max(tl.load(err_ptr + prev * P + slots), axis=0)  # unset at k = 1, and unused
    stop = (k > 1) & ((err_prev < tol) | (k - 1 >= max_iters))
    if running & stop & (tl.program_id(0) == 0):
        # Iteration k - 1 is final: its d1 came from the column sums launch k - 1 read.
        colsum = tl.sum(tl.load(col_ptr + cur * P * E + slots[:, None] * E + cols[None, :]), axis=0)
        tl.store(d1_ptr + cols, (1.0 / E) / (colsum + tiny))
        tl.store(out_ptr, (k - 1).to(tl.float32))
        tl.store(out_ptr + 1, err_prev)
        tl.store(out_ptr + 2, cur.to(tl.float32))
        tl.store(flag_ptr, 1)
    if running & ~stop:
        colsum = tl.sum(
            tl.load(col_ptr + prev * P * E + slots[:, None] * E + cols[None, :]), axis=0
        )
        d1 = (1.0 / E) / (colsum + tiny)
        lo, hi = _row_slice(T, P)
        colsum = tl.zeros([E], dtype=tl.float32)
        err = 0.0
        for start in range(lo, hi, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            valid = rows < hi
            c = tl.load(
                cost_ptr + rows[:, None] * E + cols[None, :], mask=valid[:, None], other=0.0
            )
            d0 = tl.load(d0_ptr + prev * T + rows, mask=valid, other=1.0)
            row_mass = tl.sum(c * d1[None, :], axis=1)
            d0_next = (1.0 / T) / (row_mass + tiny)
            row_err = tl.where(valid & (row_mass > 0), tl.abs(d0 / d0_next - 1.0), 0.0)
            err = tl.maximum(err, tl.max(row_err, axis=0))
            tl.store(d0_ptr + cur * T + rows, d0_next, mask=valid)
            colsum += tl.sum(tl.where(valid[:, None], c * d0_next[:, None], 0.0), axis=0)
        tl.store(col_ptr + cur * P * E + tl.program_id(0) * E + cols, colsum)
        tl.store(err_ptr + cur * P + tl.program_id(0), err)


def sinkhorn_loop(
    cost: torch.Tensor,
    d1: torch.Tensor,
    tol: float,
    max_iters: int,
    programs: int = PROGRAMS,
    block_t: int = 256,
):
    """(d0, d1, iterations, row_error) of the first iteration with row error < ``tol`` (or the
    last).

    ``cost`` [T, E] fp32 contiguous on a GPU, E a power of two; ``d1`` [E] the initial column
    scaling; ``tol`` already rounded up to fp32 (model.sinkhorn._rounded_up_tol). ``programs``
    (a power of two) and ``block_t`` only change speed.
    """
    T, E = cost.shape
    dev = cost.device
    d1 = d1.clone()
    d0 = torch.empty(2, T, dtype=torch.float32, device=dev)
    col = torch.empty(2, programs, E, dtype=torch.float32, device=dev)
    err = torch.empty(2, programs, dtype=torch.float32, device=dev)
    flag = torch.empty(1, dtype=torch.int32, device=dev)
    out = torch.empty(3, dtype=torch.float32, device=dev)
    grid = (programs,)
    _sinkhorn_start[grid](
        cost, d1, d0, col, flag, T, _TINY, E=E, P=programs, BLOCK_T=block_t, num_warps=4
    )
    for k in range(1, max_iters + 2):
        _sinkhorn_iteration[grid](
            cost,
            d1,
            d0,
            col,
            err,
            flag,
            out,
            T,
            tol,
            max_iters,
            k,
            _TINY,
            E=E,
            P=programs,
            BLOCK_T=block_t,
            num_warps=4,
        )
    final = d0.index_select(0, out[2:3].long()).view(T)
    return final, d1, out[0].long(), out[1]


def applies(logits: torch.Tensor) -> bool:
    """The kernel's domain: fp32 (T, E) on a GPU, E a power of two (a Triton block dimension)."""
    E = logits.shape[1]
    return logits.is_cuda and logits.dtype == torch.float32 and E > 0 and (E & (E - 1)) == 0
