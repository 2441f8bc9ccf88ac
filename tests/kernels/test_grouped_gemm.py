"""kernels/grouped_gemm.gmm (megatron's grouped_gemm op) against a float64 per-group reference."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.kernels.grouped_gemm import gmm


def _sizes(num_groups: int, total: int, generator: torch.Generator) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, total + 1, (num_groups - 1,), generator=generator)).values
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return edges.diff()  # random sizes, some of them usually 0


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_matches_float64_reference(trans_b: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups, k, n = 5, 24, 16
    sizes = _sizes(groups, 40, g)
    a = torch.randn(int(sizes.sum()), k, generator=g, requires_grad=True)
    b = torch.randn(groups, n, k, generator=g) if trans_b else torch.randn(groups, k, n, generator=g)
    b.requires_grad_(True)
    upstream = torch.randn(a.shape[0], n, generator=g)

    out = gmm(a, b, sizes, trans_b=trans_b)
    out.backward(upstream)

    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    w = b64.transpose(1, 2) if trans_b else b64
    rows = torch.split(a64, sizes.tolist())
    ref = torch.cat([r @ w[e] for e, r in enumerate(rows)])
    ref.backward(upstream.double())

    for got, want in ((out, ref), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert got.shape == want.shape
        assert torch.linalg.norm(got.double() - want) <= 1e-6 * torch.linalg.norm(want)


def test_gmm_rejects_mismatched_group_count():
    with pytest.raises(ValueError, match="3 group sizes for 2 weight matrices"):
        gmm(torch.randn(6, 4), torch.randn(2, 4, 4), torch.tensor([2, 2, 2]))


def test_empty_group_gets_zero_weight_gradient():
    a = torch.randn(4, 8)
    b = torch.randn(3, 8, 8, requires_grad=True)
    gmm(a, b, torch.tensor([4, 0, 0])).sum().backward()
    assert torch.count_nonzero(b.grad[1:]) == 0 and torch.count_nonzero(b.grad[0]) > 0
