"""kernels/glu (the experts' gated activation x routing probability) against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_blackmamba.kernels.glu import fused_applies, glu_with_probs, glu_with_probs_torch


def _reference64(x: torch.Tensor, probs: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * value * probs in float64, the activation written out (erf GELU, SiLU)."""
    gate, value = x.double().chunk(2, dim=-1)
    if activation == "silu":
        act = gate / (1 + torch.exp(-gate))
    else:
        act = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    return act * value * probs.double()


def _grads64(x, probs, dy, activation):
    x64 = x.detach().double().requires_grad_()
    p64 = probs.detach().double().requires_grad_()
    y64 = _reference64(x64, p64, activation)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, p64.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


def _check(
    device: str,
    dtype: torch.dtype,
    activation: str,
    rows: int,
    width: int,
    seed: int,
    tol: float,
    probs_dtype: torch.dtype = torch.float32,
):
    g = torch.Generator().manual_seed(seed)
    x = (
        (2 * torch.randn(rows, 2 * width, generator=g, dtype=torch.float64))
        .to(device, dtype)
        .requires_grad_()
    )
    probs = (
        torch.rand(rows, 1, generator=g, dtype=torch.float64)
        .to(device, probs_dtype)
        .requires_grad_()
    )
    dy = torch.randn(rows, width, generator=g, dtype=torch.float64).to(device, dtype)
    y = glu_with_probs(x, probs, activation)
    y.backward(dy)
    want_y, want_dx, want_dp = _grads64(x, probs, dy, activation)
    assert y.dtype == dtype and x.grad.dtype == dtype and probs.grad.dtype == probs.dtype
    for got, want in ((y, want_y), (x.grad, want_dx), (probs.grad, want_dp)):
        assert got.shape == want.shape
        assert _rel(got, want) <= tol


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_path_matches_float64(activation: str, seed: int):
    _check("cpu", torch.float32, activation, rows=37, width=24, seed=seed, tol=1e-6)


def test_float64_stays_float64():
    _check(
        "cpu", torch.float64, "gelu", rows=9, width=16, seed=3, tol=1e-12, probs_dtype=torch.float64
    )


def test_cpu_tensors_take_the_torch_path():
    x, probs = torch.randn(4, 8), torch.rand(4, 1)
    assert not fused_applies(x, probs)
    assert torch.equal(glu_with_probs(x, probs, "gelu"), glu_with_probs_torch(x, probs, "gelu"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'relu' unknown"):
        glu_with_probs(torch.randn(2, 4), torch.rand(2, 1), "relu")
    with pytest.raises(ValueError, match="last dimension 5 must be even"):
        glu_with_probs(torch.randn(2, 5), torch.rand(2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows,width", [(1, 8), (37, 24), (1027, 1536), (4096, 3072)])
def test_triton_kernels_match_float64(
    activation: str, dtype: torch.dtype, tol: float, rows: int, width: int
):
    """Fresh random inputs, ragged row counts and widths that are not multiples of the tiles."""
    x = torch.randn(rows, 2 * width, device="cuda", dtype=dtype)
    assert fused_applies(x, torch.rand(rows, 1, device="cuda"))
    _check("cuda", dtype, activation, rows, width, seed=rows + width, tol=tol)
