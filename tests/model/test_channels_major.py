"""The mixer's layout GEMMs against plain matmuls in float64: values, gradients and result
layouts."""

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
    return (
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    )


def _run_against_float64(
    fn, equation: str, weight_shape, input_shape, grad_shape, device, dtype, seed
):
    """fn(w, x) and its backward on fresh random inputs; the same through einsum in float64.

    Returns (out, grad w, grad x) and their float64 references."""
    gen = torch.Generator().manual_seed(seed)
    w = _leaf(*weight_shape, device=device, dtype=dtype, gen=gen)
    x = _leaf(*input_shape, device=device, dtype=dtype, gen=gen)
    g = torch.randn(*grad_shape, generator=gen, dtype=torch.float64)
    out = fn(w, x)
    out.backward(g.to(device, dtype))
    w64, x64 = (
        w.detach().double().cpu().requires_grad_(),
        x.detach().double().cpu().requires_grad_(),
    )
    ref = torch.einsum(equation, w64, x64)
    ref.backward(g)
    return (out, w.grad, x.grad), (ref.detach(), w64.grad, x64.grad)


@pytest.mark.parametrize("device,dtype,tol", list(_cases()))
def test_from_sequence_major_matches_float64(device, dtype, tol):
    s, b, h, out = 13, 3, 8, 24  # ragged on purpose
    got, want = _run_against_float64(
        lambda w, x: linear_from_sequence_major(w, x)[0],
        "oh,sbh->bos",
        (out, h),
        (s, b, h),
        (b, out, s),
        device,
        dtype,
        seed=0,
    )
    assert got[0].shape == (b, out, s) and got[0].is_contiguous()
    assert got[2].shape == (s, b, h) and got[2].is_contiguous()  # written [s, b, h], no copy needed
    for tensor, ref in zip(got, want):
        assert _rel(tensor.cpu(), ref) < tol


@pytest.mark.parametrize("device,dtype,tol", list(_cases()))
def test_from_sequence_major_in_parts_matches_float64(device, dtype, tol):
    """in_proj's two row blocks (x, z) as separate outputs: the backward sums both blocks' input
    gradients in its GEMMs (the second accumulating into the first's [s, b, h] result)."""
    s, b, h, out = 9, 2, 8, 12
    gen = torch.Generator().manual_seed(4)
    w = _leaf(out, h, device=device, dtype=dtype, gen=gen)
    x = _leaf(s, b, h, device=device, dtype=dtype, gen=gen)
    grads = [torch.randn(b, out // 2, s, generator=gen, dtype=torch.float64) for _ in range(2)]
    parts = linear_from_sequence_major(w, x, parts=2)
    torch.autograd.backward(parts, [g.to(device, dtype) for g in grads])
    w64, x64 = (
        w.detach().double().cpu().requires_grad_(),
        x.detach().double().cpu().requires_grad_(),
    )
    ref = torch.einsum("oh,sbh->bos", w64, x64)
    ref.backward(torch.cat(grads, dim=1))
    assert all(p.shape == (b, out // 2, s) and p.is_contiguous() for p in parts)
    assert x.grad.shape == (s, b, h) and x.grad.is_contiguous()
    for tensor, want in (
        (torch.cat(parts, dim=1), ref.detach()),
        (w.grad, w64.grad),
        (x.grad, x64.grad),
    ):
        assert _rel(tensor.detach().cpu(), want) < tol


def test_from_sequence_major_rejects_unequal_parts():
    with pytest.raises(ValueError, match="7 output rows do not split into 2"):
        linear_from_sequence_major(torch.zeros(7, 3), torch.zeros(2, 1, 3), parts=2)


@pytest.mark.parametrize("device,dtype,tol", list(_cases()))
def test_to_sequence_major_matches_float64(device, dtype, tol):
    s, b, h, d = 11, 2, 8, 20
    got, want = _run_against_float64(
        linear_to_sequence_major, "hd,bds->sbh", (h, d), (b, d, s), (s, b, h), device, dtype, seed=1
    )
    assert got[0].shape == (s, b, h) and got[0].is_contiguous()
    assert got[2].is_contiguous()  # the scan's backward reads dy channels-major
    for tensor, ref in zip(got, want):
        assert _rel(tensor.cpu(), ref) < tol


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    w = _leaf(5, 4, device="cpu", dtype=torch.float64, gen=gen)
    x = _leaf(6, 2, 4, device="cpu", dtype=torch.float64, gen=gen)
    w_out = _leaf(3, 5, device="cpu", dtype=torch.float64, gen=gen)
    y = _leaf(2, 5, 6, device="cpu", dtype=torch.float64, gen=gen)
    assert torch.autograd.gradcheck(linear_from_sequence_major, (w, x))
    assert torch.autograd.gradcheck(lambda w, x: linear_from_sequence_major(w, x, parts=5), (w, x))
    assert torch.autograd.gradcheck(linear_to_sequence_major, (w_out, y))


def test_channels_major_linear_takes_the_permuted_view():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)  # [s, b, h]
    out = channels_major_linear(w, x.permute(1, 2, 0))
    torch.testing.assert_close(out, torch.einsum("oh,sbh->bos", w, x))
