"""kernels/router_gating (bf16 tensor-core router GEMM) against float64 and megatron's fp32
router."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.kernels.router_gating import _split, applies, router_logits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


def _megatron_fp32(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """megatron's arithmetic without TE: fp32 GEMMs of the upcast operands, grads rounded to
    bf16."""
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y = x32 @ w32.t()
    y.backward(g)
    return y.detach(), x32.grad.to(x.dtype), w32.grad.to(w.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,hidden,experts", [(300, 64, 8), (97, 40, 3)])
def test_matches_float64_and_megatron_fp32(device: str, tokens: int, hidden: int, experts: int):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (
        (0.05 * torch.randn(experts, hidden, generator=gen))
        .to(device, torch.bfloat16)
        .requires_grad_()
    )
    g = torch.randn(tokens, experts, generator=gen).to(device)

    logits = router_logits(x, w)
    logits.backward(g)
    assert logits.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16

    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    want = (x64 @ w64.t(), g64 @ w64, g64.t() @ x64)
    ours = (logits.detach(), x.grad, w.grad)
    megatron = _megatron_fp32(x, w, g)
    assert _rel(ours[0], want[0]) < 1e-6  # fp32 sums of exact products
    # Elementwise error bound of a gradient: one bf16 rounding of the result (at most 2^-8
    # relative, attained) plus the fp32 error before it (the split's 2^-16 residual per product
    # and fp32 accumulation, together under 2^-14 of the sum of the products' magnitudes). On an
    # entry whose sum cancels, the second term dwarfs the entry, so no relative tolerance holds.
    sums_of_magnitudes = (g64.abs() @ w64.abs(), g64.t().abs() @ x64.abs())
    for got, ref, want_, scale in zip(ours[1:], megatron[1:], want[1:], sums_of_magnitudes):
        bound = 2.0**-8 * want_.abs() + 2.0**-14 * scale
        assert ((got.double() - want_).abs() <= bound).all()
        assert ((ref.double() - want_).abs() <= bound).all()
        # both round an fp32 result to bf16 once: the same error, to the split's 2^-16 residual
        assert _rel(got, want_) < 5e-3
        assert _rel(got, want_) <= _rel(ref, want_) * 1.05 + 1e-5


def test_split_reconstructs_fp32_to_2_pow_minus_16():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1000, 8, generator=gen) * torch.logspace(-20, 20, 8)  # every magnitude
    pieces = _split(g)
    hi, lo = pieces.float().chunk(2, dim=1)
    assert pieces.dtype == torch.bfloat16
    assert ((hi + lo - g).abs() <= g.abs() * 2.0**-16).all()


def test_other_dtypes_are_refused():
    x, w = torch.randn(4, 8), torch.randn(2, 8)
    assert not applies(x, w)
    with pytest.raises(TypeError, match="bf16"):
        router_logits(x, w)
