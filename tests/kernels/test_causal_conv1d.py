"""Causal depthwise conv1d (PyTorch backend) against an independent float64 tap-by-tap loop.

Fresh inputs per case from a ``torch.Generator`` seeded by the case name. Errors are relative
Frobenius norms. ``FP32_TOL = 1e-6``: each output sums only ``width`` (≤ 5) products plus a bias,
so fp32 rounding gives ~1e-7 (measured ≤ 9e-8). Gradients of weight and bias sum over
batch·seqlen (measured ≤ 2.4e-7) and get ``GRAD_TOL = 1e-5``. ``BF16_TOL = 1e-2``: the reference
sees the same bf16-rounded x, so the error is the bf16 rounding of the output (≤ 2^-9 ≈ 2e-3 per
element; measured ≤ 2.4e-3).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from megatron_blackmamba.kernels import causal_conv1d, causal_conv1d_update

FP32_TOL = 1e-6
GRAD_TOL = 1e-5
BF16_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(name: str, batch: int, dim: int, seqlen: int, width: int, bias: bool = True):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(batch, dim, seqlen, generator=g)
    weight = torch.randn(dim, width, generator=g) / width**0.5
    b = torch.randn(dim, generator=g) if bias else None
    return x, weight, b


def reference_conv(x, weight, bias=None, activation=None):
    """out[t] = bias + Σ_k weight[k] · x[t - (width-1) + k], taking x[<0] = 0; in float64."""
    x, weight = x.double(), weight.double()
    width, seqlen = weight.shape[1], x.shape[-1]
    out = torch.zeros_like(x)
    if bias is not None:
        out = out + bias.double()[:, None]
    columns = []
    for t in range(seqlen):
        column = out[..., t]
        for k in range(width):
            source = t - (width - 1) + k
            if source >= 0:
                column = column + weight[:, k] * x[..., source]
        columns.append(column)
    out = torch.stack(columns, dim=-1)
    return F.silu(out) if activation in ("silu", "swish") else out


CASES = [  # (batch, dim, seqlen, width)
    pytest.param((2, 6, 64, 4), id="L64-w4"),
    pytest.param((1, 3, 1, 4), id="L1-w4"),  # seqlen shorter than the kernel
    pytest.param((2, 5, 7, 2), id="L7-w2"),
    pytest.param((1, 4, 9, 1), id="L9-w1"),
    pytest.param((2, 3, 11, 5), id="L11-w5"),  # width the CUDA kernel lacks: torch only
]


@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES)
def test_forward_fp32_matches_reference(case, bias, activation, request):
    batch, dim, seqlen, width = case
    x, weight, b = make_inputs(request.node.name, batch, dim, seqlen, width, bias)
    out = causal_conv1d(x, weight, b, activation)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert rel_err(out, reference_conv(x, weight, b, activation)) < FP32_TOL


@pytest.mark.parametrize("case", CASES)
def test_forward_bf16(case, request):
    batch, dim, seqlen, width = case
    x, weight, b = make_inputs(request.node.name, batch, dim, seqlen, width)
    x = x.bfloat16()
    out = causal_conv1d(x, weight, b, "silu")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_conv(x, weight, b, "silu")) < BF16_TOL


@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
def test_gradients_match_reference(case, request):
    batch, dim, seqlen, width = case
    inputs = make_inputs(request.node.name, batch, dim, seqlen, width)
    grad_out = torch.randn(batch, dim, seqlen, generator=torch.Generator().manual_seed(1))

    def grads(dtype: torch.dtype, conv) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        (conv(*leaves, "silu") * grad_out.to(dtype)).sum().backward()
        return [t.grad for t in leaves]

    got = grads(torch.float32, causal_conv1d)
    ref = grads(torch.float64, reference_conv)
    for name, g, r in zip(("x", "weight", "bias"), got, ref):
        assert rel_err(g, r) < GRAD_TOL, name


def test_gradcheck_float64():
    leaves = [t.double().requires_grad_() for t in make_inputs("gradcheck", 1, 3, 6, 4)]
    assert torch.autograd.gradcheck(lambda x, w, b: causal_conv1d(x, w, b, "silu"), leaves)


@pytest.mark.parametrize("state_extra", [-1, 0, 2], ids=["state-w-1", "state-w", "state-w+2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_steps_reproduce_conv(dtype, state_extra):
    """Decoding token by token from an empty conv state must equal the full causal conv."""
    batch, dim, seqlen, width = 2, 5, 9, 4
    x, weight, b = make_inputs(f"update-{dtype}-{state_extra}", batch, dim, seqlen, width)
    x = x.to(dtype)
    conv_state = torch.zeros(batch, dim, width + state_extra, dtype=dtype)
    steps = [causal_conv1d_update(x[..., t], conv_state, weight, b, "silu") for t in range(seqlen)]
    assert steps[0].dtype == dtype
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert rel_err(torch.stack(steps, dim=-1), causal_conv1d(x, weight, b, "silu")) < tol
    # the state holds the most recent inputs, newest last (in place)
    assert torch.equal(conv_state, x[..., seqlen - conv_state.shape[-1] :])


def test_update_continues_after_prefill():
    """Prefill fills conv_state with the prompt's last `width` inputs; steps then continue the
    conv."""
    batch, dim, seqlen, width, prompt = 1, 4, 10, 4, 6
    x, weight, b = make_inputs("prefill", batch, dim, seqlen, width)
    conv_state = x[..., prompt - width : prompt].clone()
    steps = [causal_conv1d_update(x[..., t], conv_state, weight, b) for t in range(prompt, seqlen)]
    assert rel_err(torch.stack(steps, dim=-1), causal_conv1d(x, weight, b)[..., prompt:]) < FP32_TOL


def test_invalid_arguments_raise():
    x, weight, b = make_inputs("invalid", 1, 3, 5, 4)
    conv_state = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x[..., 0], conv_state, weight, b, activation="relu")
    assert not conv_state.any()  # a rejected call leaves the state alone
    with pytest.raises(ValueError, match="width-1"):
        causal_conv1d_update(x[..., 0], torch.zeros(1, 3, 2), weight, b)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[:, :2], weight, b)
