"""kernels/rms_norm (Triton RMSNorm forward and one-pass backward) against float64 references."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.kernels.rms_norm import add_rms_norm, fused_applies, rms_norm
from megatron_blackmamba.model.norm import RMSNorm


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


def _check(
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    seed: int,
    tol: float,
    eps: float = 1e-5,
):
    g = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (
        (3 * torch.randn(*shape, generator=g, dtype=torch.float64))
        .to(device, dtype)
        .requires_grad_()
    )
    w = (
        (1 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64))
        .to(device, dtype)
        .requires_grad_()
    )
    dy = torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
    y = rms_norm(x, w, eps)
    y.backward(dy)

    x64, w64 = (
        x.detach().double().cpu().requires_grad_(),
        w.detach().double().cpu().requires_grad_(),
    )
    y64 = (
        x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    )  # written out, not F.rms_norm
    y64.backward(dy.double().cpu())
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype
    for got, want in ((y, y64), (x.grad, x64.grad), (w.grad, w64.grad)):
        assert got.shape == want.shape
        assert _rel(got.cpu(), want.detach()) <= tol


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_path_matches_float64(seed: int):
    _check("cpu", torch.float32, (7, 3, 24), seed=seed, tol=1e-6)


def test_float64_stays_float64():
    _check("cpu", torch.float64, (9, 16), seed=3, tol=1e-12)


def test_cpu_tensors_take_the_torch_path_and_the_module_uses_it():
    x, w = torch.randn(4, 8), torch.rand(8)
    assert not fused_applies(x, w)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (8,), w, 1e-5))

    class _Config:
        params_dtype, sequence_parallel = torch.float32, False

    norm = RMSNorm(_Config(), 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), rms_norm(x, w, 1e-5), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 8), (37, 24), (129, 3, 1152), (2048, 4, 1472), (5, 5000)])
def test_triton_kernels_match_float64(dtype: torch.dtype, tol: float, shape: tuple[int, ...]):
    """Fresh random inputs; row counts and widths that are not multiples of the tiles."""
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    assert fused_applies(x, torch.ones(shape[-1], device="cuda", dtype=dtype))
    _check("cuda", dtype, shape, seed=sum(shape), tol=tol)


def _check_add(device: str, stream: torch.dtype, dtype: torch.dtype, shape, with_delta: bool, tol):
    """add_rms_norm against float64: the stream advanced in place (rounded to its dtype), the norm
    of the stream read in ``dtype``."""
    g = torch.Generator().manual_seed(sum(shape) + with_delta)
    residual64 = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    delta64 = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()
    w64 = (1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(dtype).double()
    residual = residual64.to(device, stream, copy=True)
    delta = delta64.to(device, dtype) if with_delta else None
    y = add_rms_norm(delta, residual, w64.to(device, dtype), 1e-5, dtype)
    stream64 = residual64.to(stream).double() + (delta64 if with_delta else 0)
    x64 = stream64.to(stream).to(dtype).double()  # the stream read in the model's dtype
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    assert y.dtype == dtype and residual.dtype == stream
    assert _rel(residual.cpu(), stream64) <= (1e-2 if stream == torch.bfloat16 else 1e-7)
    assert _rel(y.cpu(), y64) <= tol


@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("stream", [torch.float64, torch.float32])
def test_add_rms_norm_torch_path_matches_float64(with_delta: bool, stream: torch.dtype):
    x = torch.randn(3, 24, dtype=stream)
    assert not fused_applies(x, torch.ones(24))
    _check_add("cpu", stream, torch.float32, (7, 3, 24), with_delta, tol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
@pytest.mark.parametrize(
    "stream,dtype,tol",
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.float32, torch.bfloat16, 1e-2),  # residual_in_fp32
        (torch.bfloat16, torch.bfloat16, 1e-2),
    ],
)
@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 37, 1152), (129, 3, 1472)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_kernel_matches_float64(stream, dtype, tol, shape, with_delta: bool):
    """Fresh random inputs; row counts and widths that are not multiples of the tiles."""
    _check_add("cuda", stream, dtype, shape, with_delta, tol)
