"""The whole Sinkhorn loop as one Triton kernel, for the router on GPUs.

Why: the torch loop (model/sinkhorn.py) is ~19 small kernels per iteration, always max_iters
iterations. Replayed from a CUDA graph it still costs ~0.6 ms of host time per MoE layer just to
launch the graph's ~380 nodes (bench/results/h100_profile_step.md), more than the GPU needs to
run them. Here one program sweeps the (T, E) cost matrix once per iteration (it stays in L2:
T x E fp32 is 1 MiB at T = 32k, E = 8), fusing the row update of iteration k with the column
sums of iteration k + 1, and stops in the kernel at the first iteration whose error < tol: the
early-stopping rule of ``model.sinkhorn.sinkhorn``, with no host sync and one launch.

Same iterates and stopping rule as ``sinkhorn``; the sums run in a different order, so the plan
agrees to fp32 rounding rather than bit for bit (tests/model/test_sinkhorn.py compares both with
the float64 reference on GPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TINY = float(torch.finfo(torch.float32).tiny)


@triton.jit
def _sinkhorn_loop(cost_ptr, d1_ptr, d0_ptr, out_ptr, T, tol, max_iters, tiny,
                   E: tl.constexpr, BLOCK_T: tl.constexpr):
    """cost [T, E] fp32; d1 [E] in: initial column scaling, out: final; d0 [2, T] scratch;
    out [3] fp32: (iterations, row error, which d0 row is final)."""
    cols = tl.arange(0, E)
    d1 = tl.load(d1_ptr + cols)
    inv_t = 1.0 / T
    inv_e = 1.0 / E
    # d0 = row scaling for the initial d1, and the column sums it gives.
    colsum = tl.zeros([E], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        valid = rows < T
        c = tl.load(cost_ptr + rows[:, None] * E + cols[None, :], mask=valid[:, None], other=0.0)
        d0 = inv_t / (tl.sum(c * d1[None, :], axis=1) + tiny)
        tl.store(d0_ptr + rows, d0, mask=valid)
        colsum += tl.sum(tl.where(valid[:, None], c * d0[:, None], 0.0), axis=0)
    it = 0
    cur = 0
    err = 0.0
    running = 1
    while running > 0:
        it += 1
        d1 = inv_e / (colsum + tiny)
        colsum = tl.zeros([E], dtype=tl.float32)
        err = 0.0
        for start in range(0, T, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            valid = rows < T
            c = tl.load(cost_ptr + rows[:, None] * E + cols[None, :], mask=valid[:, None], other=0.0)
            d0 = tl.load(d0_ptr + cur * T + rows, mask=valid, other=1.0)
            row_mass = tl.sum(c * d1[None, :], axis=1)
            d0_next = inv_t / (row_mass + tiny)
            row_err = tl.where(valid & (row_mass > 0), tl.abs(d0 / d0_next - 1.0), 0.0)
            err = tl.maximum(err, tl.max(row_err, axis=0))
            tl.store(d0_ptr + (1 - cur) * T + rows, d0_next, mask=valid)
            colsum += tl.sum(tl.where(valid[:, None], c * d0_next[:, None], 0.0), axis=0)
        if (err < tol) or (it >= max_iters):
            running = 0
        else:
            cur = 1 - cur
    tl.store(d1_ptr + cols, d1)
    tl.store(out_ptr, it.to(tl.float32))
    tl.store(out_ptr + 1, err)
    tl.store(out_ptr + 2, cur.to(tl.float32))


def sinkhorn_loop(cost: torch.Tensor, d1: torch.Tensor, tol: float, max_iters: int):
    """(d0, d1, iterations, row_error) of the first iteration with row error < ``tol`` (or the last).

    ``cost`` [T, E] fp32 contiguous on a GPU, E a power of two; ``d1`` [E] the initial column
    scaling; ``tol`` already rounded up to fp32 (model.sinkhorn._rounded_up_tol).
    """
    T, E = cost.shape
    d1 = d1.clone()
    d0 = torch.empty(2, T, dtype=torch.float32, device=cost.device)
    out = torch.empty(3, dtype=torch.float32, device=cost.device)
    # 2048-row tiles over 16 warps: 2-3x faster than 512 x 8 warps at T = 32k (0.33 -> 0.12-0.17 ms
    # on an H100; bench/results/h100_session5_experiments.md): more loads in flight per sweep.
    _sinkhorn_loop[(1,)](cost, d1, d0, out, T, tol, max_iters, _TINY, E=E, BLOCK_T=2048, num_warps=16)
    final = d0.index_select(0, out[2:3].long()).view(T)
    return final, d1, out[0].long(), out[1]


def applies(logits: torch.Tensor) -> bool:
    """The kernel's domain: fp32 (T, E) on a GPU, E a power of two (a Triton block dimension)."""
    E = logits.shape[1]
    return logits.is_cuda and logits.dtype == torch.float32 and E > 0 and (E & (E - 1)) == 0
