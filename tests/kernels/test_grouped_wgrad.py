"""kernels/grouped_wgrad_triton: the experts' weight gradients summed into fp32 main grads with the
group ends on the device, against a float64 per-expert reference; and replayed from a CUDA graph
after the routing changed (what a graphed MoE layer does every micro-batch)."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.kernels.triton_support import triton_kernels

kernels = triton_kernels("grouped_wgrad_triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels is None, reason="the Triton kernel runs on GPUs"
)


def _sizes(experts: int, total: int, g: torch.Generator) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, total + 1, (experts - 1,), generator=g)).values
    sizes = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).diff()
    sizes[-1] += sizes[1]  # expert 1 gets no token, expert E-1 takes them
    sizes[1] = 0
    return sizes


def _reference(
    main: torch.Tensor, a: torch.Tensor, dy: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    out, start = main.double().clone(), 0
    for e, rows in enumerate(sizes.tolist()):
        out[e] += a[start : start + rows].double().t() @ dy[start : start + rows].double()
        start += rows
    return out


def _inputs(tokens, experts, k, n, dtype, g):
    sizes = _sizes(experts, tokens, g)
    a = torch.randn(tokens, k, generator=g).to(dtype).cuda()
    dy = torch.randn(tokens, n, generator=g).to(dtype).cuda()
    return sizes, a, dy


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "tokens,experts,k,n", [(1000, 5, 72, 200), (3001, 8, 256, 384), (130, 3, 136, 40)]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_accumulates_like_float64(dtype, tokens, experts, k, n, transposed):
    g = torch.Generator().manual_seed(tokens + k)
    sizes, a, dy = _inputs(tokens, experts, k, n, dtype, g)
    main = torch.randn(experts, k, n, generator=g).cuda()  # earlier micro-batches' sums
    if transposed:  # the main-grad view of a trans_b weight: [E, k, n] with stride 1 along k
        main = main.transpose(1, 2).contiguous().transpose(1, 2)
    want = _reference(main, a, dy, sizes)
    assert kernels.applies(a, dy, main)
    kernels.accumulate(main, a, dy, torch.cumsum(sizes, 0).to(torch.int32).cuda())
    # fp32 sums of exact 16-bit products: only summation order separates them from float64 (one
    # rounding of the result to bf16 would already be ~2e-3)
    assert _rel(main, want) < 1e-5


def test_replayed_graph_follows_new_routing():
    g = torch.Generator().manual_seed(0)
    experts, k, n = 6, 128, 256
    sizes, a, dy = _inputs(2048, experts, k, n, torch.bfloat16, g)
    ends = torch.cumsum(sizes, 0).to(torch.int32).cuda()
    main = torch.zeros(experts, k, n, device="cuda")
    kernels.accumulate(main, a, dy, ends)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.accumulate(main, a, dy, ends)
    for step in range(3):
        sizes, new_a, new_dy = _inputs(2048, experts, k, n, torch.bfloat16, g)
        a.copy_(new_a), dy.copy_(new_dy), ends.copy_(torch.cumsum(sizes, 0).to(torch.int32))
        main.normal_()
        want = _reference(main, a, dy, sizes)
        graph.replay()
        assert _rel(main, want) < 1e-5, f"replay {step}"
