"""megatron's grouped-GEMM op (``grouped_gemm.ops.gmm``) on PyTorch's own grouped matmul.

megatron-core's ``GroupedMLP`` runs every local expert in two grouped GEMMs through the
``grouped_gemm`` package, a CUTLASS extension that must be compiled for the machine. PyTorch
ships the same operation as ``torch._grouped_mm`` (CUTLASS, bf16, Hopper; torchtitan's MoE uses
it), differentiable. Where ``grouped_gemm`` is absent, ``patches.apply`` installs this module in
its place, so ``model.moe_grouped_gemm=true`` works with nothing to build:

* CUDA, bf16, compute capability >= 9.0, 16-byte-aligned rows: one ``torch._grouped_mm``;
* anything else (CPU, fp32/fp64, older GPUs): one matmul per expert, the reference semantics.

Weight gradients can go straight into megatron's fp32 main grads. megatron's DDP otherwise adds
each micro-batch's bf16 weight gradient into them (the experts hold ~88% of BlackMamba's
parameters, so that is most of the step's gradient traffic). For a weight whose parameter is
marked ``wgrad_into_main_grad`` and carries DDP's ``main_grad``, the backward instead sums
``a_e^T @ dy_e`` into the main grad of every expert in fp32, and autograd never sees the weight
(it enters the GEMM detached): no bf16 gradient is made, DDP's per-parameter hook never runs for
it, and a CUDA graph of the layer has no weight gradient to hand back. Skipping the hook is safe
because training builds DDP with ``overlap_grad_reduce=False`` (the reduction does not wait for
hooks). On GPUs the sum is one Triton launch that reads the group ends on the device
(kernels/grouped_wgrad_triton.py), so nothing in the layer waits for the host or depends on a
host value: the MoE layer can be captured and replayed (training.cuda_graphs).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor

from megatron_blackmamba.kernels.triton_support import triton_kernels


def torch_grouped_mm_blocker(
    dtype: torch.dtype, capability: tuple[int, int], k: int, n: int
) -> str | None:
    """Why ``torch._grouped_mm`` cannot multiply [T, k] rows by [E, k, n] experts of ``dtype`` on a
    GPU of ``capability``, or None: the one rule, read by the GEMM below and by
    model.builder.moe_graph_blocker (a host read inside a graph capture is an error)."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if dtype != torch.bfloat16 or capability < (9, 0):
        return "torch._grouped_mm needs bf16 on compute capability 9.0+"
    if k % 8 or n % 8:
        return (
            "torch._grouped_mm needs model.hidden_size and model.ffn_hidden_size to be multiples"
            " of 8"
        )
    return None


def _torch_grouped_mm_applies(a: Tensor, b: Tensor) -> bool:
    """Where this fails, ``_grouped`` splits on the host."""
    if not a.is_cuda or b.dtype != a.dtype:
        return False
    return (
        torch_grouped_mm_blocker(
            a.dtype, torch.cuda.get_device_capability(a.device), a.shape[1], b.shape[2]
        )
        is None
    )


def _grouped(a: Tensor, b: Tensor, batch_sizes: Tensor) -> Tensor:
    """Rows of ``a`` grouped by ``batch_sizes`` times ``b[e]`` [E, k, n]: -> [T, n]."""
    if _torch_grouped_mm_applies(a, b):
        offsets = torch.cumsum(batch_sizes.to(a.device, non_blocking=True), 0, dtype=torch.int32)
        return torch._grouped_mm(a, b, offs=offsets)
    groups = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ w for x, w in zip(groups, b)]) if groups else a.new_empty(0, b.shape[2])


def _main_grad_param(b: Tensor) -> torch.nn.Parameter | None:
    """The parameter ``b`` views, if its weight gradient is to go into its main grad."""
    param = b if b._base is None else b._base
    if (
        not getattr(param, "wgrad_into_main_grad", False)
        or getattr(param, "main_grad", None) is None
    ):
        return None
    return param


def _main_grad_view(param: torch.nn.Parameter, b: Tensor) -> Tensor:
    """``param.main_grad`` viewed exactly as ``b`` views ``param`` (both contiguous, same shape)."""
    main = param.main_grad
    if main.shape != param.shape or not (main.is_contiguous() and param.is_contiguous()):
        raise RuntimeError(
            f"main_grad {tuple(main.shape)} does not mirror its parameter {tuple(param.shape)}"
        )
    return main.as_strided(
        b.shape, b.stride(), main.storage_offset() + b.storage_offset() - param.storage_offset()
    )


def accumulate_wgrad(main: Tensor, a: Tensor, dy: Tensor, batch_sizes: Tensor) -> None:
    """main[e] += a_e^T @ dy_e for the row groups of ``batch_sizes``, fp32 sums, one rounding.

    GPUs (16-bit operands): one Triton launch, group ends read on the device. Elsewhere one GEMM
    per group on upcast operands (reads the sizes on the host).
    """
    kernels = triton_kernels("grouped_wgrad_triton")
    if kernels is not None and kernels.applies(a, dy, main):
        ends = torch.cumsum(batch_sizes.to(a.device, non_blocking=True), 0, dtype=torch.int32)
        kernels.accumulate(main, a, dy, ends)
        return
    start = 0
    for expert, rows in enumerate(batch_sizes.tolist()):
        if rows:
            main[expert].addmm_(
                a[start : start + rows].t().to(main.dtype), dy[start : start + rows].to(main.dtype)
            )
        start += rows


class _GroupedMMIntoMainGrad(torch.autograd.Function):
    """``_grouped(a, b)`` whose weight gradient goes into ``main`` (``b`` comes in detached)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, batch_sizes: Tensor, main: Tensor) -> Tensor:
        ctx.save_for_backward(a, b, batch_sizes)
        ctx.main = main
        return _grouped(a, b, batch_sizes)

    @staticmethod
    def backward(ctx, dy: Tensor):
        a, b, batch_sizes = ctx.saved_tensors
        dy = dy.contiguous()
        accumulate_wgrad(ctx.main, a, dy, batch_sizes)
        return _grouped(dy, b.transpose(1, 2), batch_sizes), None, None, None


def gmm(a: Tensor, b: Tensor, batch_sizes: Tensor, trans_b: bool = False) -> Tensor:
    """Rows of ``a`` [T, k], grouped by ``batch_sizes`` [E], times ``b[e]`` [E, k, n]: -> [T, n].

    With ``trans_b``, ``b`` is [E, n, k] and ``b[e].T`` is used. Groups may be empty.
    """
    if trans_b:
        b = b.transpose(1, 2)
    if batch_sizes.numel() != b.shape[0]:
        raise ValueError(f"gmm: {batch_sizes.numel()} group sizes for {b.shape[0]} weight matrices")
    # The fused path needs a to carry the autograd graph; without it, b's gradient goes to autograd.
    fused = torch.is_grad_enabled() and b.requires_grad and a.requires_grad
    param = _main_grad_param(b) if fused else None
    if param is not None:
        return _GroupedMMIntoMainGrad.apply(a, b.detach(), batch_sizes, _main_grad_view(param, b))
    return _grouped(a, b, batch_sizes)


# What megatron reads from the grouped_gemm package: ``grouped_gemm.ops.gmm``.
ops = types.SimpleNamespace(gmm=gmm)
package = types.SimpleNamespace(ops=ops)
