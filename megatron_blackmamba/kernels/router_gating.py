"""The router's gating GEMM on bf16 tensor cores, at the precision of megatron's fp32 router.

megatron computes router logits in fp32 (``moe_router_dtype="fp32"``) for stable routing. Without
Transformer Engine its RouterGatingLinearFunction casts the [tokens, h] activations to fp32 and
runs SIMT fp32 GEMMs with 8 experts as one dimension: 8.7 ms of casts and GEMMs per 32k tokens
over the 340M model's 15 routers on an H100, for a few MB of useful data. The same precision runs
on tensor cores:

* forward: products of bf16 numbers are exact in fp32 and the tensor cores sum in fp32, so
  ``mm(x, W^T, out_dtype=fp32)`` is the fp32 GEMM of the upcast operands up to summation order;
* backward: the fp32 logit gradient g is split into two bf16 pieces, g = hi + lo up to a relative
  2^-16. ``[hi | lo]`` is one bf16 operand, so grad(x) is one GEMM over K = 2 * experts and
  grad(W) one GEMM whose two halves are added in fp32. Both are then rounded to bf16 as megatron
  rounds its fp32 results (up to 2^-8 relative), 256 times the split's residual.

Off CUDA the same algorithm runs on upcast operands (``torch.mm`` has no ``out_dtype`` there), so
CPU tests exercise the split.
"""

from __future__ import annotations

import torch
from torch import Tensor


def applies(x: Tensor, weight: Tensor) -> bool:
    """bf16 activations and weight: megatron's fp32 router GEMM is otherwise kept."""
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b for bf16 a, b: exact products summed in fp32, rounded once to ``out_dtype``."""
    if a.is_cuda:
        return torch.mm(a, b) if out_dtype == a.dtype else torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a.float(), b.float()).to(out_dtype)


def _split(g: Tensor) -> Tensor:
    """fp32 [T, E] -> bf16 [T, 2E] = [hi | lo] with hi + lo = g to a relative 2^-16."""
    experts = g.shape[1]
    pieces = g.new_empty(g.shape[0], 2 * experts, dtype=torch.bfloat16)
    hi, lo = pieces[:, :experts], pieces[:, experts:]
    hi.copy_(g)
    torch.sub(g, hi, out=lo)  # computed in fp32, rounded once into lo
    return pieces


class _RouterGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _mm(x, weight.t(), torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        pieces = _split(grad.float())
        experts = weight.shape[0]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(pieces, torch.cat([weight, weight]), x.dtype)
        if ctx.needs_input_grad[1]:
            both = _mm(pieces.t(), x, torch.float32)
            grad_weight = (both[:experts] + both[experts:]).to(weight.dtype)
        return grad_x, grad_weight


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """fp32 logits x @ W^T for x [..., h] and W [experts, h], both bf16 (see ``applies``)."""
    if not applies(x, weight):
        raise TypeError(f"router_logits needs bf16 x and weight, got {x.dtype} and {weight.dtype}")
    logits = _RouterGating.apply(x.reshape(-1, x.shape[-1]), weight)
    return logits.view(*x.shape[:-1], weight.shape[0])
