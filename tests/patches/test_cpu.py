"""The CPU shims are scoped: megatron's modules see the CPU as their CUDA device, nothing else
does."""

from __future__ import annotations

import importlib

import pytest
import torch

from megatron_blackmamba import patches
from megatron_blackmamba.patches import cpu

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU shims apply without CUDA only"
)


def test_cuda_device_is_cpu_only_inside_megatron():
    patches.apply()
    for name in cpu.CUDA_ASSUMING_MODULES:
        module_torch = importlib.import_module(name).torch
        assert module_torch.cuda.current_device() == torch.device("cpu"), name
        assert module_torch.zeros(2, device="cuda").device.type == "cpu", name
        assert module_torch.empty(1, device=module_torch.cuda.current_device()).device.type == "cpu"
        assert module_torch.cuda.synchronize() is None
        assert module_torch.float32 is torch.float32 and module_torch.Tensor is torch.Tensor
    # This process's torch is untouched: asking for CUDA still fails loudly.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_megatron_allocates_its_buffers_on_cpu():
    """megatron's global memory buffer asks for torch.cuda.current_device(); it lands on the CPU."""
    from megatron.core import parallel_state

    patches.apply()
    buffer = parallel_state.GlobalMemoryBuffer()
    assert buffer.get_tensor((3, 2), torch.float32, "test").device.type == "cpu"


@pytest.mark.parametrize("total_norm", [0.5, 4.0])
def test_cpu_clip_matches_the_coefficient(total_norm: float):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    want = [p.grad.double() * min(1.0, 1.0 / (total_norm + 1e-6)) for p in params]
    cpu.clip_grad_by_total_norm_cpu(params, max_norm=1.0, total_norm=total_norm)
    for p, w in zip(params, want):
        assert torch.allclose(p.grad.double(), w, rtol=1e-6, atol=0)
