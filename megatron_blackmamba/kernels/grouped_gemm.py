"""megatron's grouped-GEMM op (``grouped_gemm.ops.gmm``) on PyTorch's own grouped matmul.

megatron-core's ``GroupedMLP`` runs every local expert in two grouped GEMMs through the
``grouped_gemm`` package, a CUTLASS extension that must be compiled for the machine. PyTorch
ships the same operation as ``torch._grouped_mm`` (CUTLASS, bf16, Hopper; torchtitan's MoE uses
it), differentiable. Where ``grouped_gemm`` is absent, ``patches.apply`` installs this module in
its place, so ``model.moe_grouped_gemm=true`` works with nothing to build:

* CUDA, bf16, compute capability >= 9.0, 16-byte-aligned rows: one ``torch._grouped_mm``;
* anything else (CPU, fp32/fp64, older GPUs): one matmul per expert, the reference semantics;
* a weight marked with ``fp8_recipe`` (training.fp8), in training: e4m3 operands, the weight
  quantised once per step (``refresh_fp8_weights``), one ``torch._scaled_grouped_mm`` on Hopper
  (kernels/fp8.py), their product per expert in fp32 on CPU.

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
from typing import Iterable

import torch
from torch import Tensor

from megatron_blackmamba.kernels import fp8
from megatron_blackmamba.kernels.fp8 import Recipe
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


def _offsets(batch_sizes: Tensor, device: torch.device) -> Tensor:
    """Group ends [E] int32 on ``device`` (no host sync)."""
    return torch.cumsum(batch_sizes.to(device, non_blocking=True), 0, dtype=torch.int32)


def _grouped(a: Tensor, b: Tensor, batch_sizes: Tensor) -> Tensor:
    """Rows of ``a`` grouped by ``batch_sizes`` times ``b[e]`` [E, k, n]: -> [T, n]."""
    if _torch_grouped_mm_applies(a, b):
        return torch._grouped_mm(a, b, offs=_offsets(batch_sizes, a.device))
    groups = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ w for x, w in zip(groups, b)]) if groups else a.new_empty(0, b.shape[2])


def _grouped_fp8(
    a: Tensor, weights: tuple[Tensor, Tensor], batch_sizes: Tensor, recipe: Recipe
) -> Tensor:
    """Rows of ``a`` (quantised here per ``recipe``) times the e4m3 ``weights`` (b8 [E, k, n]
    k-major, scale [E, n]: ``quantize_k_major``), result in a's dtype: one
    ``torch._scaled_grouped_mm`` on CUDA; elsewhere the same product per group in fp32 (the e4m3
    values are exact in fp32; CPU ``torch._scaled_mm`` takes per-tensor scales only)."""
    a8, scale_a = fp8.quantize_rows(a.contiguous(), recipe)
    b8, scale_b = weights
    if a.is_cuda:
        return torch._scaled_grouped_mm(
            a8, b8, scale_a, scale_b, offs=_offsets(batch_sizes, a.device), out_dtype=a.dtype
        )
    out = a.new_empty(a.shape[0], b8.shape[2])
    start = 0
    for expert, rows in enumerate(batch_sizes.tolist()):
        if rows:
            end = start + rows
            product = a8[start:end].float() @ b8[expert].float()
            out[start:end] = product * scale_a[start:end, None] * scale_b[expert]
        start += rows
    return out


def _base_param(b: Tensor) -> Tensor:
    """The tensor ``b`` views (the expert weight parameter for megatron's views of it)."""
    return b if b._base is None else b._base


def _main_grad_param(b: Tensor) -> torch.nn.Parameter | None:
    """The parameter ``b`` views, if its weight gradient is to go into its main grad."""
    param = _base_param(b)
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
        kernels.accumulate(main, a, dy, _offsets(batch_sizes, a.device))
        return
    start = 0
    for expert, rows in enumerate(batch_sizes.tolist()):
        if rows:
            main[expert].addmm_(
                a[start : start + rows].t().to(main.dtype), dy[start : start + rows].to(main.dtype)
            )
        start += rows


class _GroupedMMIntoMainGrad(torch.autograd.Function):
    """``_grouped(a, b)`` whose weight gradient goes into ``main`` (``b`` comes in detached).

    With ``fp8`` (recipe, the weight's cached e4m3 forms) the forward and the input gradient run
    on e4m3 operands; the weight gradient stays a bf16 GEMM summed in fp32 (in fp8 both of its
    operands would need transposing first)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, batch_sizes: Tensor, main: Tensor, fp8_: tuple | None):
        ctx.save_for_backward(a, b, batch_sizes)
        ctx.main, ctx.fp8 = main, fp8_
        if fp8_ is None:
            return _grouped(a, b, batch_sizes)
        recipe, (forward, _) = fp8_
        return _grouped_fp8(a, forward, batch_sizes, recipe)

    @staticmethod
    def backward(ctx, dy: Tensor):
        a, b, batch_sizes = ctx.saved_tensors
        dy = dy.contiguous()
        accumulate_wgrad(ctx.main, a, dy, batch_sizes)
        if ctx.fp8 is None:
            grad_a = _grouped(dy, b.transpose(1, 2), batch_sizes)
        else:
            recipe, (_, transposed) = ctx.fp8
            grad_a = _grouped_fp8(dy, transposed, batch_sizes, recipe)
        return grad_a, None, None, None, None


def refresh_fp8_weights(params: Iterable[Tensor]) -> None:
    """Quantise every expert weight marked ``fp8_recipe`` into its ``fp8_cache``: e4m3 once per
    optimizer step in the two layouts its GEMMs read (the forward's [E, k, n] and the input
    gradient's [E, n, k], both k-major), instead of twice per micro-batch. Later refreshes
    quantise into the same buffers, so CUDA graphs captured reading them stay valid. The training
    step calls this before its first forward (training/step.py); ``fp8_view`` is the [E, k, n]
    view megatron's GroupedMLP multiplies by."""
    for param in params:
        recipe = getattr(param, "fp8_recipe", None)
        if recipe is None:
            continue
        b = param.detach().view(param.fp8_view)
        cache = getattr(param, "fp8_cache", None) or (None, None)
        param.fp8_cache = tuple(
            fp8.quantize_k_major(layout, recipe, out)
            for layout, out in zip((b, b.transpose(1, 2)), cache)
        )


def _fp8_weights(param: Tensor, b: Tensor) -> tuple:
    """(recipe, the cached e4m3 weights) of a marked weight multiplied as ``b``."""
    cache = getattr(param, "fp8_cache", None)
    if cache is None or cache[0][0].shape != b.shape:
        raise RuntimeError(
            "fp8 expert weights are quantised once per step: call"
            " kernels.grouped_gemm.refresh_fp8_weights(model.parameters()) before the forward"
            " (training.step.forward_backward does)"
        )
    return param.fp8_recipe, cache


def gmm(a: Tensor, b: Tensor, batch_sizes: Tensor, trans_b: bool = False) -> Tensor:
    """Rows of ``a`` [T, k], grouped by ``batch_sizes`` [E], times ``b[e]`` [E, k, n]: -> [T, n].

    With ``trans_b``, ``b`` is [E, n, k] and ``b[e].T`` is used. Groups may be empty.
    """
    if trans_b:
        b = b.transpose(1, 2)
    if batch_sizes.numel() != b.shape[0]:
        raise ValueError(f"gmm: {batch_sizes.numel()} group sizes for {b.shape[0]} weight matrices")
    fp8_marked = getattr(_base_param(b), "fp8_recipe", None) is not None
    # The fused path needs a to carry the autograd graph; without it, b's gradient goes to autograd.
    fused = torch.is_grad_enabled() and b.requires_grad and a.requires_grad
    param = _main_grad_param(b) if fused else None
    if param is not None:
        main = _main_grad_view(param, b)
        fp8_ = _fp8_weights(param, b) if fp8_marked else None
        return _GroupedMMIntoMainGrad.apply(a, b.detach(), batch_sizes, main, fp8_)
    if fp8_marked and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise RuntimeError(
            "fp8 experts need their weight gradients to go into DDP's main grads: build the"
            " model with training.fused_wgrad_accumulation=true under megatron DDP"
        )
    # Without gradients (evaluation) the experts run in bf16: fp8 is for the training GEMMs.
    return _grouped(a, b, batch_sizes)


# What megatron reads from the grouped_gemm package: ``grouped_gemm.ops.gmm``.
ops = types.SimpleNamespace(gmm=gmm)
package = types.SimpleNamespace(ops=ops)
