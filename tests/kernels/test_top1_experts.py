"""kernels/top1_experts (each token routed to one expert and through it) against a float64
per-token loop, on fresh random inputs; the Triton kernels against the same reference on a GPU,
fc2's split reduction included.

Tolerances: fp32 operands 1e-5 relative to the float64 loop (the reference rounds nothing);
bf16 operands 1e-2 normwise (two bf16 roundings of the GEMM outputs and one of the activation, as
the grouped-GEMM path rounds them).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_blackmamba.kernels.top1_experts import (
    MAX_TOKENS,
    fused_applies,
    top1_expert_mlp,
    top1_expert_mlp_torch,
    top1_route,
    top1_route_torch,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a GPU")
HIDDEN, WIDTH, EXPERTS = 80, 48, 6  # not multiples of the kernels' blocks: the masks are exercised


def _act64(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return a / (1 + torch.exp(-a))
    return 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))


def _reference64(x, expert, p, w1, w2, activation, gated) -> torch.Tensor:
    """One token at a time in float64: act(x w1[e]) (* value half) * p, then times w2[e]."""
    rows = []
    for t in range(x.shape[0]):
        e = int(expert[t])
        fc1 = x[t].double() @ w1[e].double()
        if gated:
            gate, value = fc1.chunk(2)
            h = _act64(gate, activation) * value
        else:
            h = _act64(fc1, activation)
        rows.append((h * float(p[t])) @ w2[e].double())
    return torch.stack(rows)


def _inputs(tokens: int, gated: bool, dtype: torch.dtype, device: str, experts_used: int):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.float64)
    w1 = torch.randn(EXPERTS, HIDDEN, 2 * WIDTH if gated else WIDTH, generator=g) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, WIDTH, HIDDEN, generator=g) / WIDTH**0.5
    chosen = torch.randperm(EXPERTS, generator=g)[:experts_used]
    expert = chosen[torch.randint(0, experts_used, (tokens,), generator=g)]
    p = torch.rand(tokens, generator=g) * 0.9 + 0.05
    to = dict(device=device, dtype=dtype)
    return x.to(**to), expert.to(device), p.float().to(device), w1.to(**to), w2.to(**to), chosen


def _assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got = got.double().cpu()
    if dtype == torch.bfloat16:
        assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-2
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("tokens", [1, 7, MAX_TOKENS])
def test_torch_path_matches_float64_loop(gated, activation, tokens):
    for dtype in (torch.float64, torch.float32):
        x, expert, p, w1, w2, _ = _inputs(tokens, gated, dtype, "cpu", experts_used=3)
        got = top1_expert_mlp(x, expert, p, w1, w2, activation, gated)
        assert got.dtype == dtype and got.shape == x.shape
        want = _reference64(x, expert, p, w1, w2, activation, gated)
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            _assert_near(got, want, dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("tokens", [1, 8, MAX_TOKENS])
def test_triton_kernels_match_float64_loop_and_torch_path(dtype, gated, activation, tokens):
    x, expert, p, w1, w2, _ = _inputs(tokens, gated, dtype, "cuda", experts_used=4)
    assert fused_applies(x, w1, w2)
    got = top1_expert_mlp(x, expert, p, w1, w2, activation, gated)
    want = _reference64(x.cpu(), expert.cpu(), p.cpu(), w1.cpu(), w2.cpu(), activation, gated)
    _assert_near(got, want, dtype)
    plain = top1_expert_mlp_torch(x, expert, p, w1, w2, activation, gated)
    _assert_near(got, plain.double().cpu(), dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("tokens", [1, 8])
def test_split_fc2_matches_float64_loop(dtype, splits, tokens):
    """fc2 with its reduction split over programs (fp32 partial sums added in order); 5 splits
    of 48 in steps of 16 leave two programs nothing to add."""
    from megatron_blackmamba.kernels import top1_experts_triton as kernels

    x, expert, p, w1, w2, _ = _inputs(tokens, True, dtype, "cuda", experts_used=3)
    h = kernels.fc1(x, expert, p, w1, silu=False, gated=True)
    got = kernels.fc2(h, expert, w2, kernels.Tiles(16, 16, splits=splits))
    want = _reference64(x.cpu(), expert.cpu(), p.cpu(), w1.cpu(), w2.cpu(), "gelu", True)
    _assert_near(got, want, dtype)


def _router_inputs(tokens: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(tokens, HIDDEN, generator=g).to(device, dtype)
    weight = (torch.randn(EXPERTS, HIDDEN, generator=g) / HIDDEN**0.5).to(device, dtype)
    bias = torch.randn(EXPERTS, generator=g).to(device, dtype)
    return x, weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_route_is_the_top_sigmoid_gate_of_float64_logits(with_bias):
    x, weight, bias = _router_inputs(MAX_TOKENS, torch.float32, "cpu")
    bias = bias if with_bias else None
    counts = torch.full((EXPERTS,), 3.0, dtype=torch.float64)
    expert, gate = top1_route(x, weight, bias, counts)
    logits = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    want_gate, want_expert = torch.sigmoid(logits).max(dim=1)
    assert expert.dtype == torch.int64 and gate.dtype == torch.float32
    assert torch.equal(expert, want_expert)
    torch.testing.assert_close(gate.double(), want_gate, rtol=1e-6, atol=0)
    assert torch.equal(counts, 3 + torch.bincount(want_expert, minlength=EXPERTS).double())


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 8, MAX_TOKENS])
def test_route_kernel_matches_torch_path(dtype, with_bias, tokens):
    """The Triton route against the PyTorch one on the same inputs: the same experts and exact
    counts (fp32 logits of exact bf16 products differ in summation order only), gates to 1e-6."""
    x, weight, bias = _router_inputs(tokens, dtype, "cuda")
    bias = bias if with_bias else None
    counts = torch.zeros(EXPERTS, dtype=torch.float64, device="cuda")
    want_counts = counts.clone()
    expert, gate = top1_route(x, weight, bias, counts)
    want_expert, want_gate = top1_route_torch(x, weight, bias, want_counts)
    assert torch.equal(expert, want_expert)
    torch.testing.assert_close(gate, want_gate, rtol=1e-6, atol=0)
    assert torch.equal(counts, want_counts)
    expert_again, _ = top1_route(x, weight, bias, None)  # no counts: the same choice
    assert torch.equal(expert_again, expert)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_unchosen_experts_are_not_read(device):
    """Weights of the experts no token chose are NaN: the result stays finite and exact."""
    x, expert, p, w1, w2, chosen = _inputs(5, True, torch.float32, device, experts_used=2)
    want = _reference64(x.cpu(), expert.cpu(), p.cpu(), w1.cpu(), w2.cpu(), "gelu", True)
    unused = torch.ones(EXPERTS, dtype=torch.bool)
    unused[chosen[:2]] = False
    w1[unused.to(device)] = float("nan")
    w2[unused.to(device)] = float("nan")
    _assert_near(top1_expert_mlp(x, expert, p, w1, w2, "gelu", True), want, torch.float32)


def test_fused_path_is_only_for_small_cuda_calls_and_shapes_are_checked():
    x, expert, p, w1, w2, _ = _inputs(MAX_TOKENS + 1, True, torch.float32, "cpu", experts_used=2)
    assert not fused_applies(x, w1, w2)  # CPU, and more tokens than one block holds
    with pytest.raises(ValueError, match="does not match"):
        top1_expert_mlp(x, expert, p, w1, w2, "gelu", gated=False)
    with pytest.raises(ValueError, match="unknown"):
        top1_expert_mlp(x, expert, p, w1, w2, "relu", gated=True)
