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
    b = (
        torch.randn(groups, n, k, generator=g)
        if trans_b
        else torch.randn(groups, k, n, generator=g)
    )
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


def _marked_weight(
    groups: int, k: int, n: int, dtype: torch.dtype, g: torch.Generator
) -> torch.nn.Parameter:
    """A GroupedMLP-like [k, groups * n] weight under megatron DDP's main-grad protocol."""
    w = torch.nn.Parameter(torch.randn(k, groups * n, generator=g).to(dtype))
    w.wgrad_into_main_grad = True
    w.main_grad = torch.randn(k, groups * n, generator=g)  # what earlier micro-batches left
    return w


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_weight_grads_accumulate_into_main_grad(dtype: torch.dtype, tol: float):
    """Two micro-batches through a view of a marked parameter, as GroupedMLP calls gmm: the main
    grad gains both weight gradients in fp32 (bf16 operands, exact products), nothing rounded to
    bf16 on the way; grad(a) is the plain path's, and autograd made no gradient for the weight
    (DDP has nothing to add on top)."""
    g = torch.Generator().manual_seed(4)
    groups, k, n = 4, 16, 8
    w = _marked_weight(groups, k, n, dtype, g)
    want = w.main_grad.double().clone()
    for _micro_batch in range(2):
        sizes = _sizes(groups, 30, g)
        a = torch.randn(int(sizes.sum()), k, generator=g).to(dtype).requires_grad_()
        dy = torch.randn(a.shape[0], n, generator=g).to(dtype)
        gmm(a, w.view(groups, k, n), sizes).backward(dy)
        a64 = a.detach().double()
        start = 0
        for e, rows in enumerate(sizes.tolist()):
            want.view(groups, k, n)[e] += (
                a64[start : start + rows].t() @ dy[start : start + rows].double()
            )
            start += rows
        plain_a = a.detach().clone().requires_grad_()
        gmm(plain_a, w.detach().view(groups, k, n), sizes).backward(dy)
        torch.testing.assert_close(a.grad, plain_a.grad, rtol=0, atol=0)
    assert w.grad is None
    assert torch.linalg.norm(w.main_grad.double() - want) <= tol * torch.linalg.norm(want)


def test_unmarked_or_plain_parameters_keep_autograd_gradients():
    g = torch.Generator().manual_seed(5)
    w = _marked_weight(2, 8, 8, torch.float32, g)
    w.wgrad_into_main_grad = False
    before = w.main_grad.clone()
    gmm(torch.randn(6, 8, generator=g), w.view(2, 8, 8), torch.tensor([2, 4])).sum().backward()
    assert torch.equal(w.main_grad, before) and w.grad is not None


def test_marked_weight_with_a_constant_input_keeps_autograd_gradient():
    """The fused path hangs the weight gradient on the input's autograd graph; an input that needs
    no gradient leaves the weight's to autograd (and DDP), so it is never lost."""
    g = torch.Generator().manual_seed(6)
    w = _marked_weight(2, 8, 8, torch.float32, g)
    before = w.main_grad.clone()
    a, sizes = torch.randn(6, 8, generator=g), torch.tensor([2, 4])
    gmm(a, w.view(2, 8, 8), sizes).sum().backward()
    assert torch.equal(w.main_grad, before)
    plain = w.detach().clone().requires_grad_()  # unmarked: the reference-checked autograd path
    gmm(a, plain.view(2, 8, 8), sizes).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, plain.grad)
