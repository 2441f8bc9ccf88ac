"""kernels/mamba_decode (one Mamba-1 decode step between in_proj and out_proj) against a float64
step written out from the Mamba-1 recurrence, several steps in a row on fresh random inputs; the
Triton kernels against the same reference and against the unfused step on a GPU.

Tolerances: fp32 1e-5 relative to float64 (both compute in fp32); bf16 1e-2 normwise against the
unfused bf16 step (the same roundings; only fp32 summation orders differ).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_blackmamba.kernels.mamba_decode import fused_applies, ssm_decode, ssm_decode_unfused

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a GPU")
# Channels, ranks and states off the kernels' block sizes: the masks are exercised.
DIM, RANK, D_STATE, WIDTH = 80, 5, 6, 4


def _operands(batch: int, dtype: torch.dtype, device: str, conv_bias: bool = True) -> dict:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    xz = rand(batch, 2 * DIM)
    to = dict(device=device, dtype=dtype)
    return dict(
        x=xz[:, :DIM].to(**to),  # row-strided halves, as in_proj's output is split
        z=xz[:, DIM:].to(**to),
        conv_state=rand(batch, DIM, WIDTH).to(**to),
        ssm_state=rand(batch, DIM, D_STATE).to(device=device, dtype=torch.float32),
        conv_weight=rand(DIM, WIDTH, scale=0.5).to(**to),
        conv_bias=rand(DIM, scale=0.1).to(**to) if conv_bias else None,
        x_proj_weight=rand(RANK + 2 * D_STATE, DIM, scale=DIM**-0.5).to(**to),
        dt_proj_weight=rand(DIM, RANK, scale=RANK**-0.5).to(**to),
        A=-torch.rand(DIM, D_STATE, generator=g).add(0.5).to(device),
        D=rand(DIM).float().to(device),
        dt_bias=(torch.rand(DIM, generator=g) * 4 - 6).to(device),  # softplus -> dt ~ 0.002-0.13
    )


def _reference64(ops: dict, states: dict) -> torch.Tensor:
    """One step in float64 on ``states`` (conv, ssm; advanced in place)."""
    d = {k: (v.double() if v is not None else None) for k, v in ops.items()}
    window = torch.cat([states["conv"][..., 1:], d["x"].unsqueeze(-1)], dim=-1)
    states["conv"].copy_(window)
    u = F.silu(
        (window * d["conv_weight"]).sum(-1)
        + (d["conv_bias"] if ops["conv_bias"] is not None else 0)
    )
    dt_low, B, C = (u @ d["x_proj_weight"].T).split([RANK, D_STATE, D_STATE], dim=-1)
    dt = F.softplus(dt_low @ d["dt_proj_weight"].T + d["dt_bias"])
    h = torch.exp(dt[..., None] * d["A"]) * states["ssm"] + (dt * u)[..., None] * B[:, None, :]
    states["ssm"].copy_(h)
    return ((h * C[:, None, :]).sum(-1) + d["D"] * u) * F.silu(d["z"])


def _steps(step, batch: int, dtype: torch.dtype, device: str, conv_bias: bool = True):
    """Three steps of ``step`` and of the float64 reference, fresh x and z each step ->
    [(y, y64)], with the final states of both."""
    ops = _operands(batch, dtype, device, conv_bias)
    states = {"conv": ops["conv_state"].double(), "ssm": ops["ssm_state"].double()}
    outputs = []
    for _ in range(3):
        fresh = _operands(batch, dtype, device, conv_bias)
        ops["x"], ops["z"] = fresh["x"], fresh["z"]
        y64 = _reference64(ops, states)
        outputs.append((step(**ops), y64))
    return outputs, ops, states


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    error = (actual.double() - expected).norm() / expected.norm()
    assert error < rtol, f"relative error {error:.2e} >= {rtol}"


def _unfused(**ops):
    x_proj_weight = ops.pop("x_proj_weight")
    return ssm_decode_unfused(**ops, x_proj=lambda u: F.linear(u, x_proj_weight))


@pytest.mark.parametrize("conv_bias", [True, False])
def test_unfused_step_matches_float64(conv_bias: bool) -> None:
    outputs, ops, states = _steps(_unfused, 3, torch.float32, "cpu", conv_bias)
    for y, y64 in outputs:
        _close(y, y64, 1e-5)
    _close(ops["ssm_state"], states["ssm"], 1e-5)
    _close(ops["conv_state"], states["conv"], 1e-7)


def test_fused_path_is_cuda_only() -> None:
    assert not fused_applies(**_operands(2, torch.float32, "cpu"))
    outputs, _, _ = _steps(ssm_decode, 2, torch.float32, "cpu")  # the unfused step
    for y, y64 in outputs:
        _close(y, y64, 1e-5)


@cuda
@pytest.mark.parametrize("batch", [1, 5, 37])  # 37 > the conv kernel's 16 sequences per program
@pytest.mark.parametrize("conv_bias", [True, False])
def test_kernels_match_float64(batch: int, conv_bias: bool) -> None:
    assert fused_applies(**_operands(batch, torch.float32, "cuda", conv_bias))
    outputs, ops, states = _steps(ssm_decode, batch, torch.float32, "cuda", conv_bias)
    for y, y64 in outputs:
        _close(y, y64, 1e-5)
    _close(ops["ssm_state"], states["ssm"], 1e-5)
    assert torch.equal(ops["conv_state"].double(), states["conv"])


@cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_kernels_match_unfused_bf16(batch: int) -> None:
    ops = _operands(batch, torch.bfloat16, "cuda")
    fused = {k: (v.clone() if v is not None else None) for k, v in ops.items()}
    for _ in range(3):
        y = ssm_decode(**fused)
        y_ref = _unfused(**dict(ops))
        _close(y, y_ref.double(), 1e-2)
    _close(fused["ssm_state"], ops["ssm_state"].double(), 1e-2)
    assert torch.equal(fused["conv_state"], ops["conv_state"])
