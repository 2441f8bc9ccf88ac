"""Cross-entropy row statistics and gradient over [N, V] logits, one Triton pass each.

Why: megatron's vocab-parallel cross-entropy casts the logits to fp32 and makes ~8 passes over
that copy; at 32k tokens x 50304 vocab it took 34 ms of a 272 ms BlackMamba-340M step on an H100
(bench/results/h100_session5_experiments.md), where the bf16 logits need ~1 ms to read. Here the
forward reads each row once (online max and sum of exponentials in fp32), and the backward reads
it once more and writes the bf16 gradient: no fp32 copy, no saved softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def _row_stats(
    logits_ptr, labels_ptr, max_ptr, sumexp_ptr, target_ptr, V, vocab_start, BLOCK: tl.constexpr
):
    """Per row: max, sum(exp(x - max)) and the label's logit (0 when the label is in another
    shard)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    label = tl.load(labels_ptr + row) - vocab_start
    in_shard = (label >= 0) & (label < V)
    target = tl.load(base + tl.where(in_shard, label, 0)).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(target_ptr + row, tl.where(in_shard, target, 0.0))


@triton.jit
def _grad(
    logits_ptr, labels_ptr, lse_ptr, dloss_ptr, grad_ptr, V, vocab_start, BLOCK: tl.constexpr
):
    """grad = (softmax - onehot(label)) * dloss for one row, in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    dloss = tl.load(dloss_ptr + row)
    label = tl.load(labels_ptr + row) - vocab_start
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(logits_ptr + row * V + cols, mask=valid, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * dloss
        tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


def row_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """(max, sumexp, target) fp32 [N] for logits [N, V] contiguous and labels [N] int64."""
    N, V = logits.shape
    out = torch.empty(3, N, dtype=torch.float32, device=logits.device)
    _row_stats[(N,)](
        logits, labels, out[0], out[1], out[2], V, vocab_start, BLOCK=BLOCK_V, num_warps=8
    )
    return out[0], out[1], out[2]


def grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    vocab_start: int,
):
    """d loss / d logits [N, V] in the logits' dtype; lse and dloss fp32 [N]."""
    N, V = logits.shape
    out = torch.empty_like(logits)
    _grad[(N,)](logits, labels, lse, dloss, out, V, vocab_start, BLOCK=BLOCK_V, num_warps=8)
    return out
