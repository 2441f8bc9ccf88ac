"""Shims for machines without CUDA, scoped to the megatron-core modules that assume it.

megatron-core allocates bookkeeping tensors with ``device="cuda"`` or
``torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()`` in code that runs on every
machine. Rather than changing ``torch`` for the whole process (where a stray ``.cuda()`` would then
silently stay on the CPU), each module listed in ``CUDA_ASSUMING_MODULES`` gets its own ``torch``
whose CUDA device is the CPU; every other module, this project's included, sees the real one.
What megatron's DistributedOptimizer and alltoall dispatcher need (``torch.cuda.*Tensor`` type
names, streams and events) is not shimmed: ``model.builder`` picks the replicated optimizer and
the allgather dispatcher on CPU instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Iterator

import torch

from megatron_blackmamba.patches.registry import Patch, Target

# Every megatron-core module on the CPU training, checkpointing and generation paths that names
# the CUDA device or synchronises it.
CUDA_ASSUMING_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)


def _on_cpu(device):
    """``device`` with the CUDA device (by name, index 0 or torch.device) replaced by the CPU."""
    if device in ("cuda", 0) or (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    return device


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as those modules see it: the current device is the CPU, synchronising is a
    no-op (there is no device work to wait for); everything else is the real ``torch.cuda``."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        return None


def _factory(name: str):
    real = getattr(torch, name)

    @functools.wraps(real)
    def on_cpu(*args, device=None, **kwargs):
        return real(*args, device=_on_cpu(device), **kwargs)

    return staticmethod(on_cpu)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as those modules see it: identical, except that the CUDA device is the CPU."""

    cuda = _CudaOnCpu()
    tensor = _factory("tensor")
    zeros = _factory("zeros")
    ones = _factory("ones")
    empty = _factory("empty")
    full = _factory("full")
    arange = _factory("arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _install_torch_on_cpu() -> None:
    torch_on_cpu = _TorchOnCpu()
    for name in CUDA_ASSUMING_MODULES:
        importlib.import_module(name).torch = torch_on_cpu


def clip_grad_by_total_norm_cpu(
    parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA tensor-type assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _install_cpu_clip_grad() -> None:
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _install_cpu_embedding_sync() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_on_cpu(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


PATCHES = [
    Patch(
        name="megatron modules' torch: CUDA device->cpu",
        kind="cpu",
        targets=tuple(Target(module, "torch") for module in CUDA_ASSUMING_MODULES),
        when="CUDA is not available",
        why=(
            "buffers (global memory buffer, router weights, MoE token counters, DDP grad buffers)"
            " and the pipeline, optimizer and clipping bookkeeping are allocated on the CUDA"
            " device, and dist_checkpointing's save path synchronises it"
        ),
        applies=_no_cuda,
        install=_install_torch_on_cpu,
        test="tests/patches/test_cpu.py::test_cuda_device_is_cpu_only_inside_megatron",
    ),
    Patch(
        name="optimizer.clip_grad_by_total_norm_fp32->cpu version",
        kind="cpu",
        targets=(Target("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),),
        when="CUDA is not available",
        why=(
            "it asserts grad.type() == 'torch.cuda.FloatTensor'; the CPU version scales the same "
            "gradients by the same coefficient"
        ),
        applies=_no_cuda,
        install=_install_cpu_clip_grad,
        test="tests/patches/test_cpu.py::test_cpu_clip_matches_the_coefficient",
    ),
    Patch(
        name="LanguageModule tied-embedding sync on cpu",
        kind="cpu",
        targets=(
            Target(
                "megatron.core.models.common.language_module.language_module",
                "LanguageModule.setup_embeddings_and_output_layer",
                own=True,
            ),
        ),
        when="CUDA is not available",
        why=(
            "pipeline stages sharing the embedding move it with Tensor.cuda() before their "
            "all-reduce; only while that method runs, Tensor.cuda() returns the tensor itself"
        ),
        applies=_no_cuda,
        install=_install_cpu_embedding_sync,
        test="tests/parallel/test_parallel_equivalence.py::test_layout_matches_single_process",
    ),
]
