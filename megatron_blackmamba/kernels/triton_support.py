"""Optional Triton kernels: which module to run, or None where Triton is not installed.

The Triton kernels (Sinkhorn loop, gated activation, cross-entropy, RMSNorm, fp8 quantiser,
decode experts) are a CUDA extra; each has a PyTorch path that runs everywhere. Their wrappers
ask here once whether the kernel module imports.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

import torch

# The dtypes the kernels take: they load these and compute in fp32 (fp64 stays on PyTorch).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def triton_kernels(name: str) -> Optional[ModuleType]:
    """``megatron_blackmamba.kernels.<name>``, or None where it does not import (no Triton)."""
    try:
        return importlib.import_module(f"megatron_blackmamba.kernels.{name}")
    except ImportError:
        return None


def takes(name: str, x: torch.Tensor) -> bool:
    """Whether kernel module ``name`` can run on ``x``: a non-empty CUDA tensor of a
    ``KERNEL_DTYPES`` dtype, and the module imports."""
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and x.numel() > 0
        and triton_kernels(name) is not None
    )
