"""Selective scan (PyTorch backend) against an independent float64 step-by-step recurrence.

Every case draws fresh inputs from a ``torch.Generator`` seeded from the case's name. Errors are
relative Frobenius norms ‖out − ref‖ / ‖ref‖ against ``reference_scan`` (float64, written here
without using the implementation). Tolerances:

* ``FP32_TOL = 1e-5`` for float32 outputs, states and gradients. Each value accumulates
  O(seqlen·dstate) roundings of fp32's 2^-24 ≈ 6e-8; measured errors are ≤ 2e-7 for outputs,
  states and every gradient, so 1e-5 leaves ~50x headroom for other seeds and BLAS builds while
  any algorithmic slip (a wrong shift, a dropped term) shows up as > 1e-3.
* ``BF16_TOL = 1e-2`` for outputs when the activations (u, delta, B, C, z) are bfloat16. The
  reference sees the same bf16-rounded inputs, so the only extra error is rounding y to bf16
  (≤ 2^-9 ≈ 2e-3 per element; measured ≤ 2.2e-3 in norm), ~5x headroom. The fp32 state of the
  same call must still meet ``FP32_TOL``, which shows that the internals stay in fp32.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from megatron_blackmamba.kernels import selective_scan, selective_state_update
from megatron_blackmamba.kernels.selective_scan_torch import (
    selective_scan_chunked,
    selective_scan_loop,
)

FP32_TOL = 1e-5
BF16_TOL = 1e-2
ACTIVATIONS = ("u", "delta", "B", "C", "z")  # tensors that are bf16 in mixed-precision training


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(
    name: str,
    batch: int,
    dim: int,
    dstate: int,
    seqlen: int,
    *,
    D: bool = False,
    z: bool = False,
    delta_bias: bool = False,
    delta_softplus: bool = False,
    initial_state: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Fresh inputs for one case; activations in ``dtype``, A/D/delta_bias/state in fp32."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if delta_softplus:
        delta = randn(batch, dim, seqlen) - 1.0
    else:  # without softplus, delta (+ delta_bias) must already be a positive step size
        delta = torch.rand(batch, dim, seqlen, generator=g) * 0.5 + 0.01
    inputs = dict(
        u=randn(batch, dim, seqlen),
        delta=delta,
        A=-torch.exp(randn(dim, dstate)),
        B=randn(batch, dstate, seqlen),
        C=randn(batch, dstate, seqlen),
        D=randn(dim) if D else None,
        z=randn(batch, dim, seqlen) if z else None,
        delta_bias=(
            (0.5 * randn(dim) if delta_softplus else 0.1 * torch.rand(dim, generator=g))
            if delta_bias
            else None
        ),
        delta_softplus=delta_softplus,
        initial_state=randn(batch, dim, dstate) if initial_state else None,
    )
    for key in ACTIVATIONS:
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(dtype)
    return inputs


def reference_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None
):
    """Plain float64 recurrence straight from the definition; returns (y, last_state)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))
    batch, dim, seqlen = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    if initial_state is not None:
        h = initial_state.double()
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        z = z.double()
        y = y * z * torch.sigmoid(z)
    return y, h


SHAPES = [  # (batch, dim, dstate, seqlen, chunk_size)
    pytest.param((2, 4, 16, 37, 8), id="L37-chunk8"),  # seqlen not a multiple of the chunk
    pytest.param((1, 3, 1, 1, 64), id="L1-dstate1"),
    pytest.param((2, 5, 16, 64, 16), id="L64-chunk16"),
    pytest.param((1, 2, 4, 130, 64), id="L130-chunk64"),  # default chunk, partial last chunk
]
OPTIONS = [
    pytest.param({}, id="bare"),
    pytest.param(
        dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True), id="all"
    ),
    pytest.param(dict(D=True, delta_softplus=True), id="D-softplus"),
    pytest.param(dict(z=True, delta_bias=True, initial_state=True), id="z-bias-state"),
]
FORMS = ["chunked", "loop"]


def run_form(form: str, inputs: dict, chunk_size: int, **kwargs):
    if form == "chunked":  # through the public entry point, which picks the torch backend on CPU
        return selective_scan(**inputs, chunk_size=chunk_size, **kwargs)
    return selective_scan_loop(**inputs, **kwargs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp32_matches_float64_reference(shape, options, form, request):
    batch, dim, dstate, seqlen, chunk = shape
    inputs = make_inputs(request.node.name, batch, dim, dstate, seqlen, **options)
    y, last = run_form(form, inputs, chunk, return_last_state=True)
    y_ref, last_ref = reference_scan(**inputs)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(last, last_ref) < FP32_TOL


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_bf16_inputs(shape, form, request):
    batch, dim, dstate, seqlen, chunk = shape
    options = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
    inputs = make_inputs(
        request.node.name, batch, dim, dstate, seqlen, dtype=torch.bfloat16, **options
    )
    y, last = run_form(form, inputs, chunk, return_last_state=True)
    y_ref, last_ref = reference_scan(**inputs)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32  # mamba-ssm's convention
    assert rel_err(y, y_ref) < BF16_TOL
    assert rel_err(last, last_ref) < FP32_TOL


def test_float64_inputs_stay_float64():
    inputs = make_inputs("f64", 1, 2, 3, 10, D=True)
    inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y, last = selective_scan(**inputs, return_last_state=True)
    assert y.dtype == torch.float64 and last.dtype == torch.float64
    assert rel_err(y, reference_scan(**inputs)[0]) < 1e-12


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_gradients_match_float64_reference(shape, form, request):
    batch, dim, dstate, seqlen, chunk = shape
    all_options = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)
    inputs = make_inputs(request.node.name, batch, dim, dstate, seqlen, **all_options)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(batch, dim, seqlen, generator=g)
    grad_last = torch.randn(batch, dim, dstate, generator=g)

    def grads(inputs: dict, scan) -> dict:
        leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRAD_NAMES}
        y, last = scan({**inputs, **leaves})
        ((y * grad_y.to(y.dtype)).sum() + (last * grad_last.to(last.dtype)).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got = grads(inputs, lambda kw: run_form(form, kw, chunk, return_last_state=True))
    ref = grads(
        {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
        lambda kw: reference_scan(**kw),
    )
    for name in GRAD_NAMES:
        assert got[name].dtype == torch.float32
        assert rel_err(got[name], ref[name]) < FP32_TOL, name


def test_gradcheck_chunked_float64():
    """Finite differences through every input, several chunks (incl. a partial one) under
    checkpoint."""
    all_options = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)
    inputs = make_inputs("gradcheck", 1, 2, 3, 5, **all_options)
    leaves = tuple(inputs[k].double().requires_grad_() for k in GRAD_NAMES)

    def fn(*tensors):
        kwargs = dict(zip(GRAD_NAMES, tensors))
        return selective_scan_chunked(
            **kwargs, delta_softplus=True, return_last_state=True, chunk_size=2
        )

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 4096])
def test_chunked_matches_loop(chunk_size):
    all_options = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)
    inputs = make_inputs(f"chunk-vs-loop-{chunk_size}", 2, 6, 16, 200, **all_options)
    y, last = selective_scan_chunked(**inputs, return_last_state=True, chunk_size=chunk_size)
    y_loop, last_loop = selective_scan_loop(**inputs, return_last_state=True)
    assert rel_err(y, y_loop) < FP32_TOL
    assert rel_err(last, last_loop) < FP32_TOL


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(dict(seqlen=64, delta_offset=30.0, A=-16.0), id="large-delta-A-16"),
        pytest.param(dict(seqlen=2048, delta_offset=0.0, A=None), id="L2048-A-16-to-1e-4"),
    ],
)
def test_extreme_values_stay_finite(case):
    """Cumulative log-decays reach -1e4 here: any exp(-cumsum) factorisation would overflow."""
    seqlen = case["seqlen"]
    inputs = make_inputs(f"extreme-{seqlen}", 1, 2, 16, seqlen, D=True, z=True, delta_softplus=True)
    inputs["delta"] = inputs["delta"] + case["delta_offset"]
    if case["A"] is None:  # from fast (-16) to almost no decay (-1e-4) across the state channels
        inputs["A"] = -torch.logspace(torch.log10(torch.tensor(16.0)).item(), -4, 16).repeat(2, 1)
    else:
        inputs["A"] = torch.full((2, 16), case["A"])
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C")}
    y, last = selective_scan_chunked(**{**inputs, **leaves}, return_last_state=True)
    (y.sum() + last.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    y_ref, last_ref = reference_scan(**inputs)
    assert rel_err(y, y_ref) < FP32_TOL
    assert rel_err(last, last_ref) < FP32_TOL


@pytest.mark.parametrize("split", [1, 17, 49])
def test_split_sequence_continues_from_last_state(split):
    all_options = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)
    inputs = make_inputs(f"split-{split}", 2, 3, 8, 50, **all_options)
    y_full, last_full = selective_scan(**inputs, return_last_state=True, chunk_size=16)

    def part(sl: slice, state: torch.Tensor):
        sliced = {k: inputs[k][..., sl] for k in ACTIVATIONS}
        return selective_scan(
            **{**inputs, **sliced, "initial_state": state}, return_last_state=True, chunk_size=16
        )

    y1, state = part(slice(0, split), inputs["initial_state"])
    y2, last = part(slice(split, None), state)
    assert rel_err(torch.cat([y1, y2], dim=-1), y_full) < FP32_TOL
    assert rel_err(last, last_full) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_update_steps_reproduce_scan(dtype):
    """What generation relies on: prefill's last state + per-token steps == one long scan."""
    all_options = dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True)
    inputs = make_inputs(f"steps-{dtype}", 2, 4, 16, 12, dtype=dtype, **all_options)
    y_full, last_full = selective_scan(**inputs, return_last_state=True)
    state = inputs["initial_state"].clone()
    ys = []
    for t in range(12):
        step = {k: inputs[k][..., t] for k in ACTIVATIONS}
        ys.append(
            selective_state_update(
                state,
                step["u"],
                step["delta"],
                inputs["A"],
                step["B"],
                step["C"],
                inputs["D"],
                step["z"],
                dt_bias=inputs["delta_bias"],
                dt_softplus=True,
            )
        )
    assert ys[0].dtype == dtype
    assert rel_err(torch.stack(ys, dim=-1), y_full) < (
        FP32_TOL if dtype == torch.float32 else BF16_TOL
    )
    assert rel_err(state, last_full) < FP32_TOL  # state was advanced in place


def test_invalid_arguments_raise():
    inputs = make_inputs("invalid", 1, 2, 4, 8)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :3]})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**inputs, chunk_size=0)
