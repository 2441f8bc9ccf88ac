"""megatron's grouped-GEMM op (``grouped_gemm.ops.gmm``) on PyTorch's own grouped matmul.

megatron-core's ``GroupedMLP`` runs every local expert in two grouped GEMMs through the
``grouped_gemm`` package, a CUTLASS extension that must be compiled for the machine. PyTorch
ships the same operation as ``torch._grouped_mm`` (CUTLASS, bf16, Hopper; torchtitan's MoE uses
it), differentiable. Where ``grouped_gemm`` is absent, ``compat.apply`` installs this module in
its place, so ``model.moe_grouped_gemm=true`` works with nothing to build:

* CUDA, bf16, compute capability >= 9.0, 16-byte-aligned rows: one ``torch._grouped_mm``;
* anything else (CPU, fp32/fp64, older GPUs): one matmul per expert, the reference semantics.
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


def gmm(a: Tensor, b: Tensor, batch_sizes: Tensor, trans_b: bool = False) -> Tensor:
    """Rows of ``a`` [T, k], grouped by ``batch_sizes`` [E], times ``b[e]`` [E, k, n]: -> [T, n].

    With ``trans_b``, ``b`` is [E, n, k] and ``b[e].T`` is used. Groups may be empty.
    """
    if trans_b:
        b = b.transpose(1, 2)
    if batch_sizes.numel() != b.shape[0]:
        raise ValueError(f"gmm: {batch_sizes.numel()} group sizes for {b.shape[0]} weight matrices")
    if _torch_grouped_mm_applies(a, b):
        offsets = torch.cumsum(batch_sizes.to(a.device, non_blocking=True), 0, dtype=torch.int32)
        return torch._grouped_mm(a, b, offs=offsets)
    groups = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ w for x, w in zip(groups, b)]) if groups else a.new_empty(0, b.shape[2])


# What megatron reads from the grouped_gemm package: ``grouped_gemm.ops.gmm``.
ops = types.SimpleNamespace(gmm=gmm)
package = types.SimpleNamespace(ops=ops)
