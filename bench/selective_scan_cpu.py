"""CPU benchmark: step-by-step selective scan loop vs the chunked scan at several chunk sizes.

Prints one table with forward and training (forward+backward) throughput in tokens/s, peak
memory allocated by torch during the call, and the ratios of each to the loop's. Peak memory
comes from the torch profiler's allocation records (tracemalloc cannot see torch's allocator),
so it is measured in a separate, untimed run. Inputs follow a Mamba layer: softplus(delta +
delta_bias), D skip and silu(z) gate. Defaults finish in well under a minute on 2 cores.

    python bench/selective_scan_cpu.py [--dim 256 --seqlen 2048 --chunks 16 32 64 128]

(from the repo root, with the package installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch.autograd.profiler import profile

from megatron_blackmamba.kernels.selective_scan_torch import (
    selective_scan_chunked,
    selective_scan_loop,
)

GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch: int, dim: int, dstate: int, seqlen: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g),
        delta=torch.randn(batch, dim, seqlen, generator=g) - 2.0,
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),  # S4D-real init
        B=torch.randn(batch, dstate, seqlen, generator=g),
        C=torch.randn(batch, dstate, seqlen, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, seqlen, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.5 - 3.0,
    )


def forward(scan: Callable, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return scan(**inputs, delta_softplus=True)


def train_step(scan: Callable, inputs: dict) -> None:
    leaves = {k: inputs[k].detach().requires_grad_() for k in GRAD_INPUTS}
    scan(**leaves, delta_softplus=True).sum().backward()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch's net CPU allocations during fn, replayed from the profiler's raw records.

    Reads the "[memory]" (alloc/free) records straight from the Kineto results: building the
    profiler's FunctionEvent tree would take longer than the loop variant itself.
    """
    with profile(profile_memory=True, use_kineto=True) as prof:
        fn()
    records = [
        (e.start_ns(), e.nbytes()) for e in prof.kineto_results.events() if e.name() == "[memory]"
    ]
    current = peak = 0
    for _, nbytes in sorted(records):
        current += nbytes
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    inputs = make_inputs(args.batch, args.dim, args.dstate, args.seqlen, args.seed)
    tokens = args.batch * args.seqlen
    variants: list[tuple[str, Callable]] = [("loop", selective_scan_loop)]
    for chunk in args.chunks:
        scan = functools.partial(selective_scan_chunked, chunk_size=chunk)
        variants.append((f"chunked T={chunk}", scan))

    print(
        f"selective scan on CPU: batch {args.batch}, dim {args.dim}, dstate {args.dstate}, seqlen"
        f" {args.seqlen}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads;"
        f" median of {args.repeats} after {args.warmup} warm-up"
    )
    reference = forward(selective_scan_loop, inputs)
    rows = []
    for name, scan in variants:
        out = forward(scan, inputs)
        err = ((out - reference).norm() / reference.norm()).item()
        fwd_s = median_seconds(lambda: forward(scan, inputs), args.repeats, args.warmup)
        train_s = median_seconds(lambda: train_step(scan, inputs), args.repeats, args.warmup)
        fwd_mb = peak_bytes(lambda: forward(scan, inputs)) / 2**20
        train_mb = peak_bytes(lambda: train_step(scan, inputs)) / 2**20
        rows.append((name, tokens / fwd_s, tokens / train_s, fwd_mb, train_mb, err))

    loop = rows[0]
    header = (
        f"{'variant':<16} {'fwd tok/s':>10} {'x loop':>7} {'train tok/s':>12} {'x loop':>7}"
        f" {'fwd peak MB':>12} {'x loop':>7} {'train peak MB':>14} {'x loop':>7}"
        f" {'rel err vs loop':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, fwd, train, fwd_mb, train_mb, err in rows:
        print(
            f"{name:<16} {fwd:>10.0f} {fwd / loop[1]:>7.2f} {train:>12.0f} {train / loop[2]:>7.2f}"
            f" {fwd_mb:>12.1f} {fwd_mb / loop[3]:>7.2f} {train_mb:>14.1f}"
            f" {train_mb / loop[4]:>7.2f} {err:>16.1e}"
        )
    print(
        "x loop: ratio to the loop's value (throughput: higher is faster; memory: lower is smaller)"
    )


if __name__ == "__main__":
    main()
