"""fp8 (e4m3) operands for PyTorch's scaled grouped matmul, with scales computed on the device.

``training.fp8`` runs the experts' GEMMs through ``torch._scaled_grouped_mm`` instead of
Transformer Engine (which does not install on the GPU image). Each operand is quantised from its
own absolute maximum (dynamic scaling, no history, no host sync): an activation just before its
GEMM, a weight once per optimizer step (kernels/grouped_gemm.refresh_fp8_weights). Scales are:

* ``tensorwise``: one scale for the whole operand;
* ``rowwise``: one scale per row of the reduction (per token of an activation, per output
  channel of a weight), so a token of small activations keeps its precision beside a large one.

Both reach the GEMMs as row-wise scale vectors (a tensorwise scale repeated), the one form
``torch._scaled_grouped_mm`` takes. The fp8 values are ``x * (448 / amax)`` rounded to nearest
and saturated at +-448; the scale handed to the GEMM is the inverse, ``amax / 448`` (fp32).
Where Triton imports, quantising a CUDA operand is one read and one write (kernels/fp8_triton.py);
elsewhere (CPU tests) it is the PyTorch expression below, which is also the kernel's definition.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from megatron_blackmamba.kernels.triton_support import triton_kernels

Recipe = Literal["tensorwise", "rowwise"]
RECIPES: tuple[str, ...] = ("tensorwise", "rowwise")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# amax floor: an all-zero row quantises to zeros with a finite scale.
_TINY_AMAX = 1e-12


def fp8_blocker(device: Optional[torch.device] = None) -> Optional[str]:
    """Why this machine cannot run training.fp8, or None: the scaled grouped GEMM is a Hopper
    (compute capability 9.x) CUTLASS kernel of torch."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU of compute capability 9.0 (Hopper) and this machine has none"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        return (
            "torch._scaled_grouped_mm runs on compute capability 9.x (Hopper); this GPU is"
            f" {capability[0]}.{capability[1]}"
        )
    return None


def quantize_rows_torch(x: Tensor, recipe: Recipe) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x8 [M, K] e4m3, scale [M] fp32) with x ~= x8 * scale[:, None]."""
    magnitude = x.abs().float()
    amax = magnitude.amax(dim=1) if recipe == "rowwise" else magnitude.amax().expand(x.shape[0])
    amax = amax.clamp(min=_TINY_AMAX)
    fp8_max = amax.new_tensor(FP8_MAX)  # tensor / tensor: one IEEE division, as the kernel's
    x8 = (x.float() * (fp8_max / amax)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, (amax / fp8_max).contiguous()


def quantize_rows(
    x: Tensor, recipe: Recipe, out: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor]:
    """x [M, K] (K contiguous, 16-bit or fp32) -> (x8 [M, K] e4m3 contiguous, scale [M] fp32),
    written into ``out`` (contiguous buffers of those shapes) if given.

    Scales per row of ``x`` (rowwise) or for all of it (tensorwise)."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    kernels = triton_kernels("fp8_triton")
    if kernels is not None and kernels.applies(x):
        return kernels.quantize_rows(x, rowwise=recipe == "rowwise", out=out)
    fresh = quantize_rows_torch(x, recipe)
    if out is None:
        return fresh
    for buffer, value in zip(out, fresh):
        buffer.copy_(value)
    return out


def quantize_k_major(
    b: Tensor, recipe: Recipe, out: Optional[tuple[Tensor, Tensor]] = None
) -> tuple[Tensor, Tensor]:
    """Weights b [E, K, N] (any strides) -> (b8 [E, K, N] with K contiguous: the column-major
    operand the scaled GEMMs take; scale [E, N] fp32, one per output column of each matrix),
    written into ``out`` (an earlier result of this function) if given."""
    experts, k, n = b.shape
    rows = b.transpose(1, 2).contiguous().view(experts * n, k)  # a copy unless K is contiguous
    if out is not None:
        b8, scale = out
        quantize_rows(rows, recipe, (b8.transpose(1, 2).view(experts * n, k), scale.view(-1)))
        return out
    b8, scale = quantize_rows(rows, recipe)
    return b8.view(experts, n, k).transpose(1, 2), scale.view(experts, n)
