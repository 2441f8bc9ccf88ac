"""GPU check of the CUDA kernels (mamba_ssm, causal_conv1d) against the PyTorch backend.

For each shape (the 340M config's Mamba layer: d_inner 2304, d_state 16, conv width 4,
dt_rank 72, seqlen 2048 at batch 2 and 4; plus a small one) and each dtype (fp32, bf16) it draws
fresh random inputs shaped like a Mamba layer's and reports, in one table:

* ‖out − ref‖/‖ref‖ of the CUDA and the PyTorch backend against a float64 PyTorch reference, for
  the scan's output, last state and input gradients (u, delta, A, B, C, D, z, delta_bias), the
  conv's output and gradients (x, weight, bias), and one decode step of each (output and state).
  Both backends and the reference see the same inputs (bf16 ones upcast for the reference); with
  ``--ref-channels K`` these accuracy runs use only the first K channels (every op is per channel
  except the sums over channels in dB, dC, which then cover K channels), as float64 at full width
  is slow; timings always use the full shape.
* the median time of each backend (CUDA events, after warm-up) for forward and forward+backward
  side by side, with the torch/cuda ratio.

Errors above the tolerance (fp32 1e-4, bf16 3e-2: ≥100x and ~10x the expected rounding) are
flagged HIGH and make the exit status 1. Needs a CUDA GPU and ``pip install
megatron_blackmamba[cuda]`` (``--backends torch`` checks only the fallback). ``--dry-run`` prints
the plan without touching CUDA.

    python bench/gpu_kernel_check.py [--shapes small 340m-b2 340m-b4] [--dtypes fp32 bf16] [--out
    FILE]

(from the repo root, with the package installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from harness import rel_err, time_ms  # noqa: I001  (importing harness puts the repo on sys.path)

from megatron_blackmamba.kernels import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_state_update,
)
from megatron_blackmamba.kernels import cuda as kernels_cuda


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    dim: int  # d_inner
    dstate: int
    width: int
    dt_rank: int
    seqlen: int


SHAPES = {
    s.name: s
    for s in (
        Shape("small", batch=2, dim=64, dstate=16, width=4, dt_rank=8, seqlen=256),
        Shape("340m-b2", batch=2, dim=2304, dstate=16, width=4, dt_rank=72, seqlen=2048),
        Shape("340m-b4", batch=4, dim=2304, dstate=16, width=4, dt_rank=72, seqlen=2048),
    )
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
# Tensor name -> its channel (d_inner) axis, for --ref-channels slicing; B and C have none.
CHANNEL_AXIS = {
    "u": 1,
    "delta": 1,
    "z": 1,
    "x": 1,
    "dt": 1,
    "state": 1,
    "conv_state": 1,
    "A": 0,
    "D": 0,
    "delta_bias": 0,
    "dt_bias": 0,
    "weight": 0,
    "bias": 0,
}
SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CONV_GRADS = ("x", "weight", "bias")
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- inputs shaped like a Mamba layer
def scan_inputs(
    shape: Shape, dtype: torch.dtype, gen: torch.Generator, device: torch.device
) -> Tensors:
    """Activations in ``dtype``; A, D, delta_bias in fp32, initialised as in Mamba."""

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device)

    b, d, n, L, r = shape.batch, shape.dim, shape.dstate, shape.seqlen, shape.dt_rank
    # delta comes from a rank-r projection, and its bias is softplus^-1 of dt ~ logU[1e-3, 1e-1]
    delta = torch.einsum("blr,rd->bdl", randn(b, L, r), randn(r, d) * r**-0.5)
    dt = torch.exp(
        torch.rand(d, generator=gen, device=device) * (math.log(0.1) - math.log(1e-3))
        + math.log(1e-3)
    )
    return dict(
        u=randn(b, d, L).to(dtype),
        delta=delta.to(dtype),
        A=-torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1)
        * torch.exp(0.1 * randn(d, n)),
        B=randn(b, n, L).to(dtype),
        C=randn(b, n, L).to(dtype),
        D=1 + 0.1 * randn(d),
        z=randn(b, d, L).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


def conv_inputs(
    shape: Shape, dtype: torch.dtype, gen: torch.Generator, device: torch.device
) -> Tensors:
    bound = shape.width**-0.5  # nn.Conv1d's default init range for a depthwise conv

    def uniform(*size: int) -> torch.Tensor:
        return ((torch.rand(*size, generator=gen, device=device) * 2 - 1) * bound).to(dtype)

    return dict(
        x=torch.randn(shape.batch, shape.dim, shape.seqlen, generator=gen, device=device).to(dtype),
        weight=uniform(shape.dim, shape.width),
        bias=uniform(shape.dim),
    )


def step_inputs(
    scan: Tensors, conv: Tensors, shape: Shape, gen: torch.Generator
) -> tuple[Tensors, Tensors]:
    """Decode-step inputs: token 0 of the sequence inputs plus random fp32 SSM / activation-dtype
    conv states."""
    device, dtype = scan["u"].device, scan["u"].dtype
    ssm = dict(
        state=torch.randn(shape.batch, shape.dim, shape.dstate, generator=gen, device=device),
        x=scan["u"][..., 0],
        dt=scan["delta"][..., 0],
        A=scan["A"],
        B=scan["B"][..., 0],
        C=scan["C"][..., 0],
        D=scan["D"],
        z=scan["z"][..., 0],
        dt_bias=scan["delta_bias"],
    )
    conv_step = dict(
        x=conv["x"][..., 0],
        weight=conv["weight"],
        bias=conv["bias"],
        conv_state=torch.randn(
            shape.batch, shape.dim, shape.width, generator=gen, device=device
        ).to(dtype),
    )
    return {k: v.contiguous() for k, v in ssm.items()}, {
        k: v.contiguous() for k, v in conv_step.items()
    }


def slice_channels(tensors: Tensors, channels: int) -> Tensors:
    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        axis = CHANNEL_AXIS.get(name)
        return t if axis is None else t.narrow(axis, 0, min(channels, t.shape[axis])).contiguous()

    return {k: cut(k, v) for k, v in tensors.items()}


def to_float64(tensors: Tensors) -> Tensors:
    return {k: v.double() for k, v in tensors.items()}


# ---------------------------------------------------------------- the ops under test
def call_scan(t: Tensors, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return selective_scan(
        t["u"],
        t["delta"],
        t["A"],
        t["B"],
        t["C"],
        t["D"],
        t["z"],
        t["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
        backend=backend,
    )


def call_conv(t: Tensors, backend: str) -> tuple[torch.Tensor, None]:
    return causal_conv1d(t["x"], t["weight"], t["bias"], "silu", backend=backend), None


def call_scan_step(t: Tensors, backend: str) -> Tensors:
    state = t["state"].clone()
    y = selective_state_update(
        state,
        t["x"],
        t["dt"],
        t["A"],
        t["B"],
        t["C"],
        t["D"],
        t["z"],
        t["dt_bias"],
        True,
        backend=backend,
    )
    return {"y": y, "state": state}


def call_conv_step(t: Tensors, backend: str) -> Tensors:
    state = t["conv_state"].clone()
    return {
        "y": causal_conv1d_update(t["x"], state, t["weight"], t["bias"], "silu", backend=backend),
        "state": state,
    }


def forward_backward(
    call: Callable, tensors: Tensors, grads: tuple[str, ...], backend: str, grad_out: torch.Tensor
) -> Tensors:
    """Outputs and input gradients of ``call`` under the loss <y, grad_out>."""
    leaves = {k: v.detach().requires_grad_(k in grads) for k, v in tensors.items()}
    y, last_state = call(leaves, backend)
    y.backward(grad_out.to(y.dtype))
    results = {"y": y.detach()}
    if last_state is not None:
        results["last_state"] = last_state.detach()
    results.update({f"d{k}": leaves[k].grad for k in grads})
    return results


# ---------------------------------------------------------------- report
class Table:
    HEADER = ("shape", "dtype", "op", "metric", "cuda", "torch", "check")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.high = 0

    def error(self, shape: str, dtype: str, op: str, metric: str, errs: dict[str, float]) -> None:
        tol = TOLERANCE[dtype]
        ok = all(e < tol for e in errs.values())  # NaN compares False: flagged
        self.high += not ok
        cells = [f"{errs[b]:.2e}" if b in errs else "-" for b in ("cuda", "torch")]
        self.rows.append(
            (
                shape,
                dtype,
                op,
                f"relerr {metric}",
                *cells,
                f"{'ok' if ok else 'HIGH'} (< {tol:.0e})",
            )
        )

    def timing(self, shape: str, dtype: str, op: str, metric: str, ms: dict[str, float]) -> None:
        cells = [f"{ms[b]:.3f}" if b in ms else "-" for b in ("cuda", "torch")]
        ratio = f"torch/cuda {ms['torch'] / ms['cuda']:.1f}x" if len(ms) == 2 else ""
        self.rows.append((shape, dtype, op, metric, *cells, ratio))

    def render(self) -> str:
        widths = [
            max(len(str(r[i])) for r in (self.HEADER, *self.rows)) for i in range(len(self.HEADER))
        ]
        lines = [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in (self.HEADER, *self.rows)
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def check_case(
    shape: Shape, dtype_name: str, args: argparse.Namespace, gen: torch.Generator, table: Table
) -> None:
    device, dtype = torch.device("cuda"), DTYPES[dtype_name]
    scan, conv = scan_inputs(shape, dtype, gen, device), conv_inputs(shape, dtype, gen, device)
    scan_step, conv_step = step_inputs(scan, conv, shape, gen)
    row = (shape.name, dtype_name)

    # accuracy: both backends and the float64 reference on the same (possibly channel-sliced) inputs
    sliced = (
        (lambda t: slice_channels(t, args.ref_channels)) if args.ref_channels > 0 else (lambda t: t)
    )
    for op, call, tensors, grads, out_like in (
        ("selective_scan", call_scan, sliced(scan), SCAN_GRADS, "u"),
        ("causal_conv1d", call_conv, sliced(conv), CONV_GRADS, "x"),
    ):
        grad_out = torch.randn(tensors[out_like].shape, generator=gen, device=device)
        ref = forward_backward(call, to_float64(tensors), grads, "torch", grad_out.double())
        got = {b: forward_backward(call, tensors, grads, b, grad_out) for b in args.backends}
        for key in ref:
            table.error(*row, op, key, {b: rel_err(got[b][key], ref[key]) for b in args.backends})
    for op, call, tensors in (
        ("selective_state_update", call_scan_step, sliced(scan_step)),
        ("causal_conv1d_update", call_conv_step, sliced(conv_step)),
    ):
        ref = call(to_float64(tensors), "torch")
        got = {b: call(tensors, b) for b in args.backends}
        for key in ref:
            table.error(*row, op, key, {b: rel_err(got[b][key], ref[key]) for b in args.backends})

    # speed: full shape, CUDA events
    for op, call, tensors, grads, out_like in (
        ("selective_scan", call_scan, scan, SCAN_GRADS, "u"),
        ("causal_conv1d", call_conv, conv, CONV_GRADS, "x"),
    ):
        grad_out = torch.randn(tensors[out_like].shape, generator=gen, device=device)
        with torch.no_grad():
            fwd = {
                b: time_ms(lambda b=b: call(tensors, b), args.warmup, args.repeats)
                for b in args.backends
            }
        train = {
            b: time_ms(
                lambda b=b: forward_backward(call, tensors, grads, b, grad_out),
                args.warmup,
                args.repeats,
            )
            for b in args.backends
        }
        table.timing(*row, op, "fwd ms", fwd)
        table.timing(*row, op, "fwd+bwd ms", train)
    for op, call, tensors in (
        ("selective_state_update", call_scan_step, scan_step),
        ("causal_conv1d_update", call_conv_step, conv_step),
    ):
        with torch.no_grad():
            step = {
                b: time_ms(lambda b=b: call(tensors, b), args.warmup, args.repeats)
                for b in args.backends
            }
        table.timing(*row, op, "step ms", step)


def plan(args: argparse.Namespace) -> str:
    lines = [
        f"gpu_kernel_check plan: backends {', '.join(args.backends)} vs a float64 torch reference"
    ]
    for name in args.shapes:
        s = SHAPES[name]
        ref = (
            f"first {args.ref_channels} channels"
            if 0 < args.ref_channels < s.dim
            else "all channels"
        )
        lines.append(
            f"  {name}: batch {s.batch}, d_inner {s.dim}, d_state {s.dstate}, conv width {s.width},"
            f" dt_rank {s.dt_rank}, seqlen {s.seqlen}; accuracy on {ref}"
        )
    for dtype in args.dtypes:
        lines.append(f"  {dtype}: flag relerr >= {TOLERANCE[dtype]:.0e}")
    lines += [
        "  selective_scan (delta_softplus, D, z, delta_bias): relerr y, last_state, d"
        + ", d".join(SCAN_GRADS),
        "  causal_conv1d (bias, silu): relerr y, d" + ", d".join(CONV_GRADS),
        "  selective_state_update, causal_conv1d_update: relerr y, state after one step",
        (
            f"  timing: fwd and fwd+bwd (steps: one call), median of {args.repeats} CUDA-event"
            f" timings after {args.warmup} warm-up"
        ),
    ]
    return "\n".join(lines)


def environment(seed: int) -> str:
    versions = []
    for package in (kernels_cuda.MAMBA_SSM, kernels_cuda.CAUSAL_CONV1D):
        error = kernels_cuda.import_error(package)
        versions.append(
            f"{package} {kernels_cuda.package_version(package) if error is None else 'MISSING'}"
        )
    return (
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA"
        f" {torch.version.cuda}), {', '.join(versions)}, seed {seed}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--backends", nargs="+", choices=["cuda", "torch"], default=["cuda", "torch"]
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--ref-channels",
        type=int,
        default=512,
        help="accuracy runs on the first K channels only (0: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="default: a fresh random seed, printed"
    )
    default_out = (
        os.path.join(os.environ["OUT"], "kernel_check.txt") if "OUT" in os.environ else None
    )
    parser.add_argument(
        "--out",
        default=default_out,
        help="also write the table here (default: $OUT/kernel_check.txt when OUT is set)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the planned checks and exit")
    return parser.parse_args(argv)


def emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        emit(plan(args), args.out)
        return 0
    if not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    table = Table()
    for name in args.shapes:
        for dtype_name in args.dtypes:
            check_case(SHAPES[name], dtype_name, args, gen, table)
    summary = (
        f"{table.high} error(s) above tolerance" if table.high else "all errors within tolerance"
    )
    emit("\n".join([plan(args), environment(seed), "", table.render(), "", summary]), args.out)
    return 1 if table.high else 0


if __name__ == "__main__":
    sys.exit(main())
