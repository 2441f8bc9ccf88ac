"""Each token routed to one expert and through it, the expert read on the device: MoE decode.

Why: a decode step hands each MoE layer a few tokens (one per sequence). The dropless path sorts
them by expert, counts them, runs two CUTLASS grouped GEMMs over every expert's offsets and
unsorts them again, each a small kernel of its own, and at batch 1 the grouped GEMM alone takes
14.5 us to read one 14 MB expert (bench/results/h200_decode_kernels.md). With top-1 routing each
token's output is simply

    y[t] = act(x[t] @ w1[e]) * p[t] @ w2[e],   e = expert[t]

(``act`` gated or not, as megatron's GroupedMLP computes it: the fc1 product rounded to x's dtype,
the activation times p, rounded again, then fc2). ``top1_expert_mlp`` runs that as Triton kernels
(kernels/top1_experts_triton.py) on CUDA tensors of at most ``MAX_TOKENS`` tokens: each program
owns one expert and a slice of the outputs, skips the experts no token chose, and reads its slice
of the weights once. Elsewhere it runs the PyTorch expression below, which gathers each token's
expert weights (the reference the kernels are tested against).

``top1_route`` picks (expert, p) as the Sinkhorn router does at inference: the top sigmoid gate
of fp32 logits. On CUDA it is one kernel where PyTorch runs six (GEMM, bias, sigmoid, max, and
two for the load counts), each a launch of its own in a decode step.

Shapes: x [T, H]; expert [T] int64 in [0, E); p [T] (fp32); w1 [E, H, F1] with F1 = 2F for a
gated unit ([gate | value] halves, megatron's layout) else F; w2 [E, F, H]; result [T, H] in x's
dtype.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_blackmamba.kernels.glu import ACTIVATIONS, glu_with_probs_torch
from megatron_blackmamba.kernels.triton_support import takes, triton_kernels

MAX_TOKENS = 64  # the kernels hold every token of the call in one block of registers

_MODULE = "top1_experts_triton"
_kernels = partial(triton_kernels, _MODULE)


def _activation_with_probs(fc1: Tensor, p: Tensor, activation: str, gated: bool) -> Tensor:
    """megatron's ``activation_func_with_probs``: fp32 math rounded once for the gated unit
    (kernels/glu.py); ``act(fc1) * p`` in PyTorch's type promotion otherwise."""
    if gated:
        return glu_with_probs_torch(fc1, p, activation)
    act = F.silu(fc1) if activation == "silu" else F.gelu(fc1)
    return (act * p).to(fc1.dtype)


def top1_expert_mlp_torch(
    x: Tensor, expert: Tensor, p: Tensor, w1: Tensor, w2: Tensor, activation: str, gated: bool
) -> Tensor:
    """The reference: each token's expert weights gathered, one batched product per GEMM."""
    fc1 = torch.bmm(x.unsqueeze(1), w1.index_select(0, expert)).squeeze(1)
    h = _activation_with_probs(fc1, p.unsqueeze(-1), activation, gated)
    return torch.bmm(h.unsqueeze(1), w2.index_select(0, expert)).squeeze(1)


def top1_route_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The reference: fp32 logits of the upcast operands, their top sigmoid gate."""
    logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    gate, expert = torch.sigmoid(logits).max(dim=1)
    if counts is not None:
        count_tokens(counts, expert)
    return expert, gate


def count_tokens(counts: Tensor, expert: Tensor) -> None:
    """counts [E] += how many of the tokens' experts (expert [T] int64) are each e."""
    counts.index_add_(0, expert, torch.ones_like(expert, dtype=counts.dtype))


def top1_route(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """x [T, H], router weight [E, H] (bias [E]) -> (expert [T] int64, gate [T] fp32): each
    token's largest sigmoid(x W^T + b), logits in fp32; ``counts`` [E] (when given) gains the
    tokens each expert got."""
    if fused_applies(x, weight):
        return _kernels().route(x, weight, bias, counts)
    return top1_route_torch(x, weight, bias, counts)


def fused_applies(x: Tensor, *weights: Tensor) -> bool:
    """Whether the Triton kernels take these: at most MAX_TOKENS CUDA tokens of a kernel dtype,
    contiguous operands of one dtype, Triton importable."""
    return (
        0 < x.shape[0] <= MAX_TOKENS
        and all(w.dtype == x.dtype for w in weights)
        and all(t.is_contiguous() for t in (x, *weights))
        and takes(_MODULE, x)
    )


def top1_expert_mlp(
    x: Tensor,
    expert: Tensor,
    p: Tensor,
    w1: Tensor,
    w2: Tensor,
    activation: str = "gelu",
    gated: bool = True,
) -> Tensor:
    """x [T, H] -> [T, H]: each token through expert[t]'s MLP, weighted by p[t] (see module)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert activation {activation!r} unknown; choose one of {ACTIVATIONS}")
    width = w2.shape[1]
    if w1.shape != (w2.shape[0], x.shape[1], 2 * width if gated else width):
        raise ValueError(
            f"top1_expert_mlp: w1 {tuple(w1.shape)} does not match x {tuple(x.shape)} and"
            f" w2 {tuple(w2.shape)} (gated={gated})"
        )
    if fused_applies(x, w1, w2):
        return _kernels().top1_expert_mlp(
            x, expert.contiguous(), p.float().contiguous(), w1, w2, activation == "silu", gated
        )
    return top1_expert_mlp_torch(x, expert, p, w1, w2, activation, gated)
