"""The mixer's layout GEMMs against plain matmuls in float64: values, gradients and result layouts."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.model.channels_major import (
    channels_major_linear,
    linear_from_sequence_major,
    linear_to_sequence_major,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (dtype, relative tolerance against float64): bf16 only where the GPU runs it.
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


def _cases():
    for device in DEVICES:
        for dtype, tol in DTYPES + ([(torch.bfloat16, 1e-2)] if device == "cuda" else []):
            yield device, dtype, tol


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _leaf(*shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()


@pytest.mark.parametrize("device,dtype,tol", list(_cases()))
def test_from_sequence_major_matches_float64(device, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    s, b, h, out = 13, 3, 8, 24  # ragged on purpose
    w = _leaf(out, h, device=device, dtype=dtype, gen=gen)
    x = _leaf(s, b, h, device=device, dtype=dtype, gen=gen)
    g = torch.randn(b, out, s, generator=gen, dtype=torch.float64)

    y = linear_from_sequence_major(w, x)
    y.backward(g.to(device, dtype))

    w64, x64 = w.detach().double().cpu().requires_grad_(), x.detach().double().cpu().requires_grad_()
    ref = torch.einsum("oh,sbh->bos", w64, x64)
    ref.backward(g)
    assert y.shape == (b, out, s) and y.is_contiguous()
    assert x.grad.shape == (s, b, h) and x.grad.is_contiguous()  # written [s, b, h], no copy needed
    assert _rel(y.cpu(), ref) < tol
    assert _rel(x.grad.cpu(), x64.grad) < tol
    assert _rel(w.grad.cpu(), w64.grad) < tol


@pytest.mark.parametrize("device,dtype,tol", list(_cases()))
def test_to_sequence_major_matches_float64(device, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    s, b, h, d = 11, 2, 8, 20
    w = _leaf(h, d, device=device, dtype=dtype, gen=gen)
    y = _leaf(b, d, s, device=device, dtype=dtype, gen=gen)
    g = torch.randn(s, b, h, generator=gen, dtype=torch.float64)

    out = linear_to_sequence_major(w, y)
    out.backward(g.to(device, dtype))

    w64, y64 = w.detach().double().cpu().requires_grad_(), y.detach().double().cpu().requires_grad_()
    ref = torch.einsum("hd,bds->sbh", w64, y64)
    ref.backward(g)
    assert out.shape == (s, b, h) and out.is_contiguous()
    assert y.grad.is_contiguous()  # the scan's backward reads dy channels-major
    assert _rel(out.cpu(), ref) < tol
    assert _rel(y.grad.cpu(), y64.grad) < tol
    assert _rel(w.grad.cpu(), w64.grad) < tol


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    w = _leaf(5, 4, device="cpu", dtype=torch.float64, gen=gen)
    x = _leaf(6, 2, 4, device="cpu", dtype=torch.float64, gen=gen)
    w_out = _leaf(3, 5, device="cpu", dtype=torch.float64, gen=gen)
    y = _leaf(2, 5, 6, device="cpu", dtype=torch.float64, gen=gen)
    assert torch.autograd.gradcheck(linear_from_sequence_major, (w, x))
    assert torch.autograd.gradcheck(linear_to_sequence_major, (w_out, y))


def test_channels_major_linear_takes_the_permuted_view():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)  # [s, b, h]
    out = channels_major_linear(w, x.permute(1, 2, 0))
    torch.testing.assert_close(out, torch.einsum("oh,sbh->bos", w, x))
