"""kernels/top1_experts (each token through its one routed expert) against a float64 per-token
loop, on fresh random inputs; the Triton kernels against the same reference on a GPU.

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
