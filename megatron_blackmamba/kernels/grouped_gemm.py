"""megatron's grouped-GEMM op (``grouped_gemm.ops.gmm``) on PyTorch's own grouped matmul.

megatron-core's ``GroupedMLP`` runs every local expert in two grouped GEMMs through the
``grouped_gemm`` package, a CUTLASS extension that must be compiled for the machine. PyTorch
ships the same operation as ``torch._grouped_mm`` (CUTLASS, bf16, Hopper; torchtitan's MoE uses
it), differentiable. Where ``grouped_gemm`` is absent, ``compat.apply`` installs this module in
its place, so ``model.moe_grouped_gemm=true`` works with nothing to build:

* CUDA, bf16, compute capability >= 9.0, 16-byte-aligned rows: one ``torch._grouped_mm``;
* anything else (CPU, fp32/fp64, older GPUs): one matmul per expert, the reference semantics.

Weight gradients can go straight into megatron's fp32 main grads. megatron's DDP otherwise adds
each micro-batch's bf16 weight gradient into them (the experts hold ~88% of BlackMamba's
parameters, so that is most of the step's gradient traffic). For a weight whose parameter is
marked ``wgrad_into_main_grad`` and carries DDP's ``main_grad``, the backward instead accumulates
``a_e^T @ dy_e`` into the main grad of each expert with one fp32-output GEMM (``addmm`` with
``out_dtype``) and marks the parameter ``grad_added_to_main_grad``: the protocol megatron's own
linear layers follow with ``gradient_accumulation_fusion``, which needs apex here.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor


def _torch_grouped_mm_applies(a: Tensor, b: Tensor) -> bool:
    if not (a.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return a.shape[1] % 8 == 0 and b.shape[2] % 8 == 0  # 16-byte rows for bf16


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
    if not getattr(param, "wgrad_into_main_grad", False) or getattr(param, "main_grad", None) is None:
        return None
    if not hasattr(param, "grad_added_to_main_grad"):
        return None  # not megatron's DDP: nobody would skip adding param.grad on top
    return param


def _main_grad_view(param: torch.nn.Parameter, b: Tensor) -> Tensor:
    """``param.main_grad`` viewed exactly as ``b`` views ``param`` (both contiguous, same shape)."""
    main = param.main_grad
    if main.shape != param.shape or not (main.is_contiguous() and param.is_contiguous()):
        raise RuntimeError(f"main_grad {tuple(main.shape)} does not mirror its parameter {tuple(param.shape)}")
    return main.as_strided(b.shape, b.stride(), main.storage_offset() + b.storage_offset() - param.storage_offset())


def _accumulate(main: Tensor, a: Tensor, dy: Tensor) -> None:
    """main += a^T @ dy with fp32 sums and one rounding (on CPU: on upcast operands)."""
    if a.is_cuda and main.dtype != a.dtype:
        torch.addmm(main, a.t(), dy, out_dtype=main.dtype, out=main)
    else:
        main.addmm_(a.t().to(main.dtype), dy.to(main.dtype))


class _GroupedMMIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, batch_sizes: Tensor, param: torch.nn.Parameter) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.param = param
        # The backward splits the rows per expert on the host: copy the sizes now, without a
        # sync; the copy has long finished when the backward reads it.
        ctx.sizes = torch.empty(batch_sizes.shape, dtype=batch_sizes.dtype, pin_memory=batch_sizes.is_cuda)
        ctx.sizes.copy_(batch_sizes, non_blocking=True)
        ctx.copied = torch.cuda.Event() if batch_sizes.is_cuda else None
        if ctx.copied is not None:
            ctx.copied.record()
        return _grouped(a, b, batch_sizes)

    @staticmethod
    def backward(ctx, dy: Tensor):
        a, b = ctx.saved_tensors
        if ctx.copied is not None:
            ctx.copied.synchronize()
        dy = dy.contiguous()
        grad_a = _grouped(dy, b.transpose(1, 2), ctx.sizes) if ctx.needs_input_grad[0] else None
        main = _main_grad_view(ctx.param, b)
        start = 0
        for expert, rows in enumerate(ctx.sizes.tolist()):
            if rows:
                _accumulate(main[expert], a[start:start + rows], dy[start:start + rows])
            start += rows
        ctx.param.grad_added_to_main_grad = True
        # Autograd still hands a gradient to the parameter, so DDP's hook runs (and skips it).
        return grad_a, torch.empty_like(b), None, None


def gmm(a: Tensor, b: Tensor, batch_sizes: Tensor, trans_b: bool = False) -> Tensor:
    """Rows of ``a`` [T, k], grouped by ``batch_sizes`` [E], times ``b[e]`` [E, k, n]: -> [T, n].

    With ``trans_b``, ``b`` is [E, n, k] and ``b[e].T`` is used. Groups may be empty.
    """
    if trans_b:
        b = b.transpose(1, 2)
    if batch_sizes.numel() != b.shape[0]:
        raise ValueError(f"gmm: {batch_sizes.numel()} group sizes for {b.shape[0]} weight matrices")
    param = _main_grad_param(b) if torch.is_grad_enabled() and b.requires_grad else None
    if param is not None:
        return _GroupedMMIntoMainGrad.apply(a, b, batch_sizes, param)
    return _grouped(a, b, batch_sizes)


# What megatron reads from the grouped_gemm package: ``grouped_gemm.ops.gmm``.
ops = types.SimpleNamespace(gmm=gmm)
package = types.SimpleNamespace(ops=ops)
