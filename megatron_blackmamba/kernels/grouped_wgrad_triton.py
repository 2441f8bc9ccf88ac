"""The grouped experts' weight gradients, summed into fp32 main grads by one Triton kernel.

Why: for expert e with token rows [start_e, end_e), dW_e = a[rows]^T @ dy[rows]. cuBLAS (one
``addmm`` per expert) needs each expert's row count on the host, so the backward either waits for
the device or reads a copy made in the forward; either way the MoE layer cannot be replayed from a
CUDA graph, whose captured host values would be stale at the next micro-batch. Here the group ends
stay on the device: every program reads its expert's [start, end) from ``ends`` and walks those
rows, so the launch is the same for every routing and is captured once (training.cuda_graphs).

Each program owns one [BLOCK_K, BLOCK_N] tile of one expert's weight gradient: it sums over the
expert's rows in fp32 on tensor cores, then adds the tile into the main grad (read, add, store;
no atomics, so the result is deterministic). bf16/fp16 operands only: fp32 operands would run as
tf32 in ``tl.dot``, so those stay on the per-expert path (kernels/grouped_gemm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shape: the best of 8 swept at BlackMamba-340M's expert GEMMs on an H100, 0.85-0.96x the
# speed of cuBLAS per expert (bench/grouped_gemm_check.py; bench/PERF_NOTES.md).
BLOCK_K, BLOCK_N, BLOCK_T, WARPS, STAGES = 128, 256, 64, 8, 3


@triton.jit
def _wgrad_accumulate(
    a_ptr,
    dy_ptr,
    ends_ptr,
    out_ptr,
    K,
    N,
    stride_a,
    stride_dy,
    stride_oe,
    stride_ok,
    stride_on,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """out[e, k-tile, n-tile] += a[start_e:end_e, k-tile]^T @ dy[start_e:end_e, n-tile].

    Grid (k-tiles x n-tiles, experts), k fastest: the programs running together share one
    expert's rows and a few n-tiles of dy, which stay in L2.
    """
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_k = tl.program_id(0) % tiles_k
    pid_n = tl.program_id(0) // tiles_k
    e = tl.program_id(1)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    end = tl.load(ends_ptr + e).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, n_ok = ks < K, ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dy + ns[None, :],
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a), dy, acc)
    out = out_ptr + e * stride_oe + ks[:, None] * stride_ok + ns[None, :] * stride_on
    mask = k_ok[:, None] & n_ok[None, :]
    tl.store(out, tl.load(out, mask=mask) + acc, mask=mask)


def applies(a: torch.Tensor, dy: torch.Tensor, out: torch.Tensor) -> bool:
    """CUDA, 16-bit operands of one dtype, fp32 accumulator, row-contiguous operands."""
    return (
        a.is_cuda
        and a.dtype in (torch.bfloat16, torch.float16)
        and dy.dtype == a.dtype
        and out.dtype == torch.float32
        and a.stride(1) == 1
        and dy.stride(1) == 1
    )


def accumulate(out: torch.Tensor, a: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> None:
    """out[e] += a[rows_e]^T @ dy[rows_e] in fp32 for out [E, K, N], a [T, K], dy [T, N] and
    ``ends`` [E] (int, on the device): the cumulative row counts, rows_e = ends[e-1]:ends[e]."""
    experts, k, n = out.shape
    grid = (triton.cdiv(k, BLOCK_K) * triton.cdiv(n, BLOCK_N), experts)
    _wgrad_accumulate[grid](
        a,
        dy,
        ends,
        out,
        k,
        n,
        a.stride(0),
        dy.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
        BLOCK_T=BLOCK_T,
        num_warps=WARPS,
        num_stages=STAGES,
    )
