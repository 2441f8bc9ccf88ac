"""GPU check of the fused Mamba-1 decode step (kernels/mamba_decode_triton.py) at BlackMamba's
mixer shapes (d_inner 2304, dt_rank 72, d_state 16, conv width 4), and a sweep of its blocks.

For batch 1, 8 and 64 it reports the fused step's error against the unfused step run in float64,
and per block shape (channels per conv program, which sets the number of x_proj partial sums;
channels per state-update program) the fused step's time per call beside the unfused step's four
kernels (causal-conv1d's update, the x_proj and dt_proj GEMVs, mamba-ssm's state update). Calls
are replayed from a CUDA graph (launch gaps included, as in a decode step) and cycle through
``LAYERS`` copies of the weights and states, more than the L2 holds, so each call reads them
from HBM as a decode step's layers do. The fastest shape per batch is marked: what
``ssm_decode``'s defaults should be.

    python bench/mamba_decode_check.py [--dry-run]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
from harness import device_line, graph_replay_us, rel_err  # puts the repo on sys.path

from megatron_blackmamba.kernels.mamba_decode import ssm_decode_unfused

DIM, RANK, D_STATE, WIDTH = 2304, 72, 16, 4
BATCHES = (1, 8, 64)
LAYERS = 64  # 64 x (0.8 MB of x_proj and dt_proj + states): past the 50 MB L2 at batch 8 and up
BLOCKS = list(itertools.product((32, 64, 128), (64, 128, 256)))  # (block_d, block_c)


def layer(batch: int, seed: int) -> dict:
    """One layer's step operands in bf16 (constants fp32), x and z as in_proj's strided halves."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    xz = rand(batch, 2 * DIM).bfloat16()
    return dict(
        x=xz[:, :DIM],
        z=xz[:, DIM:],
        conv_state=rand(batch, DIM, WIDTH).bfloat16(),
        ssm_state=rand(batch, DIM, D_STATE),
        conv_weight=rand(DIM, WIDTH, scale=0.5).bfloat16(),
        conv_bias=rand(DIM, scale=0.1).bfloat16(),
        x_proj_weight=rand(RANK + 2 * D_STATE, DIM, scale=DIM**-0.5).bfloat16(),
        dt_proj_weight=rand(DIM, RANK, scale=RANK**-0.5).bfloat16(),
        A=-torch.rand(DIM, D_STATE, device="cuda", generator=g).add(0.5),
        D=rand(DIM),
        dt_bias=torch.rand(DIM, device="cuda", generator=g) * 4 - 6,
    )


def unfused(ops: dict) -> torch.Tensor:
    x_proj_weight = ops["x_proj_weight"]
    rest = {k: v for k, v in ops.items() if k != "x_proj_weight"}
    return ssm_decode_unfused(**rest, x_proj=lambda u: F.linear(u, x_proj_weight))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    if args.dry_run:
        print(f"batches {BATCHES}; {len(BLOCKS)} block shapes; {LAYERS} layers' operands")
        return 0
    from megatron_blackmamba.kernels import mamba_decode_triton as kernels

    print(device_line())
    print("| batch | kernel | block_d | block_c | us per call | vs unfused |")
    print("|---|---|---|---|---|---|")
    for batch in BATCHES:
        layers = [layer(batch, seed) for seed in range(LAYERS)]
        ops = {k: (v.clone() if v is not None else None) for k, v in layers[0].items()}
        want = unfused({k: (v.double() if v.is_floating_point() else v) for k, v in ops.items()})
        got = kernels.ssm_decode(**ops)
        unfused_us = graph_replay_us(lambda i: unfused(layers[i]), LAYERS)
        print(
            f"batch {batch}: fused error vs the float64 unfused step {rel_err(got, want):.2e}",
            flush=True,
        )
        print(f"| {batch} | unfused (4 kernels) | | | {unfused_us:.1f} | 1.00x |")
        results = []
        for block_d, block_c in BLOCKS:
            us = graph_replay_us(
                lambda i: kernels.ssm_decode(**layers[i], block_d=block_d, block_c=block_c),
                LAYERS,
            )
            results.append((us, block_d, block_c))
        best = min(results)
        for us, block_d, block_c in results:
            mark = " **best**" if (us, block_d, block_c) == best else ""
            print(
                f"| {batch} | fused (2 kernels) | {block_d} | {block_c} | {us:.1f}{mark} |"
                f" {unfused_us / us:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
