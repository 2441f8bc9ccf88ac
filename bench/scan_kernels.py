"""The Mamba-1 selective scan: mamba-ssm's CUDA kernel against this project's
(kernels/csrc/selective_scan.cu), side by side in one run, at one micro-batch of a Mamba layer of
the 340M config (16 x 2048 tokens, d_inner 2304, d_state 16, bf16, with z, D, delta_bias and
softplus, as the mixer calls it).

Forward and forward+backward times (medians of CUDA-event timings) and the forward+backward's GPU
work (profiler kernel times: the scan kernels plus the zero-fills and casts each implementation
launches), and the error of every output and input gradient against float64 (the torch backend
run in float64) on the first --ref-batch sequences of the timed batch; the largest is reported.

    python bench/scan_kernels.py [--batch 16] [--dim 2304] [--seqlen 2048] [--segments auto,1,16]
        [--out DIR] [--dry-run]

``--segments`` adds a row of this project's kernel per time split (``auto``: its own choice,
``selective_scan_cuda.time_segments``).
"""

from __future__ import annotations

import argparse
import os

import torch
from harness import (
    device_line,
    device_ms,
    publish_table,
    rel_err,
    time_ms,
)  # noqa: I001  (puts the repo on sys.path)

from megatron_blackmamba import kernels
from megatron_blackmamba.kernels import cuda as mamba_ssm_kernels
from megatron_blackmamba.kernels import selective_scan_cuda

HEADER = [
    (
        "| scan [batch, dim, seqlen] | implementation | fwd ms | fwd+bwd ms | fwd+bwd GPU work ms "
        "| max rel err vs fp64 (out, grads) | vs mamba-ssm (fwd+bwd GPU work) |"
    ),
    "|---|---|---|---|---|---|---|",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--dim", type=int, default=2304, help="channels (d_inner on one rank)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="activation dtype",
    )
    p.add_argument(
        "--segments",
        default="auto",
        help="comma-separated time splits of this project's kernel, one row each (auto or a count)",
    )
    p.add_argument("--ref-batch", type=int, default=2, help="sequences checked against float64")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (builds, autotuning)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--out", default=os.environ.get("OUT", ""), help="folder for the table (default: $OUT)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def scan_inputs(
    batch: int, dim: int, seqlen: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Inputs shaped and scaled as the mixer's: B and C are views of one x_proj output, z of
    in_proj's."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, seqlen, device="cuda", generator=g).to(dtype)
    x_dbl = torch.randn(batch, 80, seqlen, device="cuda", generator=g).to(dtype)
    A = -torch.arange(1, 17, device="cuda", dtype=torch.float32).repeat(dim, 1)
    return dict(
        u=xz[:, :dim],
        z=xz[:, dim:],
        B=x_dbl[:, 48:64],
        C=x_dbl[:, 64:80],
        delta=(0.5 * torch.randn(batch, dim, seqlen, device="cuda", generator=g)).to(dtype),
        A=A * torch.rand(dim, 1, device="cuda", generator=g).add(0.5),
        D=torch.rand(dim, device="cuda", generator=g),
        delta_bias=torch.rand(dim, device="cuda", generator=g)
        .mul(4)
        .sub(6),  # softplus -> ~dt 0.002..0.1
    )


def leaves(
    inputs: dict[str, torch.Tensor], rows: int | None = None, dtype: torch.dtype | None = None
) -> dict:
    """Fresh leaf copies (first ``rows`` sequences, optionally cast) that collect gradients."""
    out = {}
    for name, t in inputs.items():
        t = t[:rows] if rows is not None and t.dim() == 3 else t
        out[name] = t.detach().to(dtype or t.dtype).requires_grad_()
    return out


def run_scan(impl: str, x: dict, segments: int | None = None) -> torch.Tensor:
    args = (
        x["u"],
        x["delta"],
        x["A"],
        x["B"],
        x["C"],
        x["D"],
        x["z"],
        x["delta_bias"],
        True,
        False,
    )
    if impl == "mamba-ssm":
        return mamba_ssm_kernels.selective_scan(*args)
    if impl == "blackmamba":
        return selective_scan_cuda.selective_scan(*args, segments=segments)
    return kernels.selective_scan(*args, backend="torch")


def max_error(impl: str, inputs: dict, rows: int, segments: int | None) -> float:
    """Largest rel err over the output and every input gradient, against float64 on ``rows``
    sequences.

    ``impl`` runs the whole batch, as timed (the own kernel picks its forward by grid size), with
    the output's gradient zero past those rows, so that its gradients summed over the batch (A, D,
    delta_bias) are those of the rows alone."""
    ref_in = leaves(inputs, rows, torch.float64)
    got_in = leaves(inputs)
    ref_out, got_out = run_scan("torch", ref_in), run_scan(impl, got_in, segments)
    dout = torch.zeros(got_out.shape, device=got_out.device, dtype=torch.float64)
    dout[:rows] = torch.randn_like(ref_out)
    ref_out.backward(dout[:rows])
    got_out.backward(dout.to(got_out.dtype))
    errors = [rel_err(got_out[:rows], ref_out.detach())]
    for name, ref in ref_in.items():
        grad = got_in[name].grad
        errors.append(rel_err(grad[:rows] if grad.dim() == 3 else grad, ref.grad))
    return max(errors)


def variants(args: argparse.Namespace) -> list[tuple[str, int | None, str]]:
    """(implementation, time segments, row label): mamba-ssm's, then this kernel per split."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = selective_scan_cuda.time_segments(args.batch, args.dim, args.seqlen, sms)
    out = [("mamba-ssm", None, "mamba-ssm")]
    for item in args.segments.split(","):
        segments = auto if item.strip() == "auto" else int(item)
        label = f"blackmamba, {segments} segment{'s' * (segments > 1)}"
        out.append(("blackmamba", segments, label + (" (auto)" if item.strip() == "auto" else "")))
    return out


def rows_for(args: argparse.Namespace) -> list[str]:
    dtype = getattr(torch, args.dtype)
    inputs = scan_inputs(args.batch, args.dim, args.seqlen, dtype, args.seed)
    rows, base = [], None
    for impl, segments, label in variants(args):
        x = leaves(inputs)
        dout = torch.randn(args.batch, args.dim, args.seqlen, device="cuda", dtype=dtype)

        def fwd():
            with torch.no_grad():
                return run_scan(impl, x, segments)

        def fwd_bwd():
            torch.autograd.backward(run_scan(impl, x, segments), dout)

        fwd_ms = time_ms(fwd, args.warmup, args.repeats)
        total_ms = time_ms(fwd_bwd, args.warmup, args.repeats)
        gpu_ms = device_ms(fwd_bwd, args.warmup, args.repeats)
        base = base or gpu_ms
        err = max_error(impl, inputs, args.ref_batch, segments)
        rows.append(
            f"| [{args.batch}, {args.dim}, {args.seqlen}] {args.dtype} | {label} | {fwd_ms:.3f} |"
            f" {total_ms:.3f} | {gpu_ms:.3f} | {err:.1e} | {base / gpu_ms:.2f}x |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        print(
            f"plan: mamba-ssm, blackmamba at [{args.batch}, {args.dim}, {args.seqlen}]"
            f" {args.dtype} (time segments: {args.segments}), {args.repeats} repeats; float64 check"
            f" on {args.ref_batch} sequences"
        )
        return
    table = "\n".join([device_line(), *HEADER, *rows_for(args)])
    publish_table(args.out, "scan_kernels.md", table)


if __name__ == "__main__":
    main()
