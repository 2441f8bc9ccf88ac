"""``act(x1) * x2 * probs``: the experts' gated activation, weighted by the routing probability.

This is what megatron's GroupedMLP calls ``activation_func_with_probs`` (x = [x1 | x2], the fc1
output of the gate and value halves; probs [T, 1]). ``glu_with_probs`` runs it

* as one Triton kernel forward and one backward (kernels/glu_triton.py) for CUDA tensors when
  Triton imports, and
* as the plain PyTorch expression below otherwise (CPU, fp64, or no Triton), which is also the
  definition the kernel is tested against.

Both compute in fp32 (the PyTorch path in fp64 for fp64 inputs) and round once to x's dtype.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_blackmamba.kernels.triton_support import takes, triton_kernels

_MODULE = "glu_triton"
_kernels = partial(triton_kernels, _MODULE)  # the Triton module, or None without Triton


ACTIVATIONS = ("gelu", "silu")


def glu_with_probs_torch(x: Tensor, probs: Tensor, activation: str) -> Tensor:
    """The reference: math in fp32 (fp64 for fp64 inputs), result in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    gate, value = x.to(compute).chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate)
    return (act * value * probs.to(compute)).to(x.dtype)


class _FusedGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, activation: str) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        p = probs.reshape(-1).contiguous()
        ctx.save_for_backward(rows, p)
        ctx.silu = activation == "silu"
        ctx.shapes = (x.shape, probs.shape, probs.dtype)
        y = _kernels().forward(rows, p, ctx.silu)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        rows, p = ctx.saved_tensors
        x_shape, p_shape, p_dtype = ctx.shapes
        dx, dp = _kernels().backward(rows, p, dy.reshape(rows.shape[0], -1).contiguous(), ctx.silu)
        return dx.view(x_shape), dp.view(p_shape).to(p_dtype), None


def fused_applies(x: Tensor, probs: Tensor) -> bool:
    """Whether the Triton kernels take these: non-empty CUDA tensors of at most fp32 precision,
    one probability per row of ``x``, and Triton importable."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return rows > 0 and probs.numel() == rows and takes(_MODULE, x)


def glu_with_probs(x: Tensor, probs: Tensor, activation: str = "gelu") -> Tensor:
    """act(x[..., :F]) * x[..., F:] * probs for x [..., 2F] and probs broadcasting as [..., 1]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated activation {activation!r} unknown; choose one of {ACTIVATIONS}")
    if x.shape[-1] % 2:
        raise ValueError(
            f"glu_with_probs: last dimension {x.shape[-1]} must be even (gate and value halves)"
        )
    if fused_applies(x, probs):
        return _FusedGLU.apply(x, probs, activation)
    return glu_with_probs_torch(x, probs, activation)
