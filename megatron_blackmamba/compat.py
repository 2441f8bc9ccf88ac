"""The few places where megatron-core 0.16.1 assumes CUDA or Transformer Engine, patched here.

megatron-core is written for CUDA machines with Transformer Engine (TE). BlackMamba must also run
on CPU (tests, the tiny main job, CI) and on CUDA machines without TE. Rather than forking
megatron code, this module patches exactly the assumptions that break, and nothing is patched on
a machine that has what megatron expects:

Without Transformer Engine (CPU or CUDA):
  * ``MambaStack`` builds its final norm with ``TENorm`` unconditionally -> this project's
    sequence-parallel-aware torch ``RMSNorm`` (model/norm.py).
  * ``moe_utils`` only binds ``te_general_gemm`` inside its TE import branch, yet the router
    gating reads the name -> bind it to ``None`` so the plain ``torch.mm`` path runs.

Without CUDA:
  * ``torch.cuda.current_device()`` is used as a device for buffers (global memory buffer, router
    weights, MoE token counters, DDP grad buffers) -> returns the CPU device.
  * ``torch.cuda.synchronize()`` is called unconditionally by dist_checkpointing's save path ->
    a no-op (there is no device work to wait for).
  * ``Tensor.cuda()`` is called on the tied embedding when pipeline stages sync it -> returns
    the tensor itself (on a CPU-only build it could only raise).
  * the pipeline schedules allocate their token counter with ``device="cuda"`` -> the schedules
    module sees a ``torch`` whose ``zeros`` maps that device to the CPU.
  * ``torch.cuda.Stream``/``Event`` used by some dispatch and timing paths -> not patched: callers
    must pick the ``allgather`` dispatcher on CPU (``resolve_moe_dispatcher`` does that).

Call :func:`apply` once, before building models; it is idempotent and returns what it patched.
"""

from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

_applied: list[str] | None = None


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def apply() -> list[str]:
    """Patch what this machine lacks; returns the names of the patches applied."""
    global _applied
    if _applied is not None:
        return _applied
    patches: list[str] = []
    if not have_transformer_engine():
        patches += _patch_no_te()
    if not torch.cuda.is_available():
        patches += _patch_no_cuda()
    if patches:
        logger.info("megatron-core compatibility patches: %s", ", ".join(patches))
    _applied = patches
    return patches


def _patch_no_te() -> list[str]:
    from megatron.core.ssm import mamba_block
    from megatron.core.transformer.moe import moe_utils

    from megatron_blackmamba.model.norm import RMSNorm

    mamba_block.TENorm = RMSNorm
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return ["mamba_block.TENorm->RMSNorm", "moe_utils.te_general_gemm=None"]


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_device_sync(device=None) -> None:
    return None


class _TorchWithCpuZeros(types.ModuleType):
    """``torch`` as seen by megatron's schedules: identical, except zeros(device="cuda") -> CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _stay_on_cpu(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _patch_no_cuda() -> list[str]:
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_device_sync
    torch.Tensor.cuda = _stay_on_cpu
    schedules.torch = _TorchWithCpuZeros()
    return [
        "torch.cuda.current_device->cpu",
        "torch.cuda.synchronize->no-op",
        "Tensor.cuda->identity",
        "schedules.torch.zeros(cuda)->cpu",
    ]


def resolve_moe_dispatcher(requested: str) -> str:
    """'auto' -> alltoall on CUDA (megatron's fast path), allgather on CPU (alltoall needs streams)."""
    if requested == "auto":
        return "alltoall" if torch.cuda.is_available() else "allgather"
    if requested == "alltoall" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.moe_dispatcher=alltoall needs CUDA (megatron creates torch.cuda streams); "
            "use parallel.moe_dispatcher=allgather or auto on CPU"
        )
    return requested
