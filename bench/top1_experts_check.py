"""GPU check of the MoE decode kernels (kernels/top1_experts_triton.py) at BlackMamba's expert
shapes, and a sweep of their launch shapes.

For 1, 8 and 64 tokens (decode batch sizes) routed at random over the 8 experts, it reports the
kernels' error against a float64 per-token reference and, per launch shape (outputs per program,
reduction step, warps, pipeline depth), each kernel's device time and the bandwidth it reaches
on the weights of the experts the tokens chose (each read once). The grouped-GEMM pair the
dispatcher path runs for the same tokens (torch._grouped_mm, the tokens sorted by expert) is
timed beside it. The fastest shape per kernel and token count is marked: what ``tiles_for``
should pick.

    python bench/top1_experts_check.py [--dry-run]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from harness import device_line, device_ms, rel_err  # also puts the repo on sys.path

from megatron_blackmamba.kernels.glu import glu_with_probs_torch
from megatron_blackmamba.kernels.grouped_gemm import gmm
from megatron_blackmamba.kernels.top1_experts import top1_expert_mlp_torch

HIDDEN, WIDTH, EXPERTS = 1152, 3072, 8
TOKENS = (1, 8, 64)
# (block_n, block_k, warps, stages) tried per kernel
SHAPES = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4)))


def inputs(tokens: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(EXPERTS, HIDDEN, 2 * WIDTH, device="cuda", generator=g) / 34).bfloat16()
    w2 = (torch.randn(EXPERTS, WIDTH, HIDDEN, device="cuda", generator=g) / 55).bfloat16()
    expert = torch.randint(0, EXPERTS, (tokens,), device="cuda", generator=g)
    p = torch.rand(tokens, device="cuda", generator=g)
    return x, expert, p, w1, w2


def grouped_pair(x, expert, p, w1, w2):
    """The dispatcher path's expert compute for the same tokens: sort, two grouped GEMMs
    (kernels/grouped_gemm.gmm, torch._grouped_mm here) around the gated activation."""
    order = torch.argsort(expert)
    sizes = torch.bincount(expert, minlength=EXPERTS)
    h = glu_with_probs_torch(gmm(x[order], w1, sizes), p[order, None], "gelu")
    return gmm(h, w2, sizes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    if args.dry_run:
        print(f"tokens {TOKENS}; {len(SHAPES)} launch shapes per kernel; H {HIDDEN} F {WIDTH}")
        return 0
    from megatron_blackmamba.kernels import top1_experts_triton as kernels

    print(device_line())
    print("| tokens | kernel | block_n | block_k | warps | stages | device us | weights GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in TOKENS:
        x, expert, prob, w1, w2 = inputs(tokens, seed=tokens)
        chosen = int(torch.unique(expert).numel())
        want = top1_expert_mlp_torch(
            x.double(), expert, prob.double(), w1.double(), w2.double(), "gelu", True
        )
        got = kernels.top1_expert_mlp(x, expert, prob, w1, w2, silu=False, gated=True)
        grouped_us = 1e3 * device_ms(lambda: grouped_pair(x, expert, prob, w1, w2), 5, 50)
        print(
            f"tokens {tokens} ({chosen} experts chosen): error vs float64 {rel_err(got, want):.2e};"
            f" grouped-GEMM pair {grouped_us:.1f} us"
        )
        h = kernels.fc1(x, expert, prob, w1, silu=False, gated=True)
        runs = {
            "fc1": (lambda t: kernels.fc1(x, expert, prob, w1, False, True, t), 2 * WIDTH),
            "fc2": (lambda t: kernels.fc2(h, expert, w2, t), WIDTH),
        }
        for name, (run, columns) in runs.items():
            weight_bytes = chosen * HIDDEN * columns * 2
            results = []
            for shape in SHAPES:
                tiles = kernels.Tiles(*shape)
                try:
                    us = 1e3 * device_ms(lambda: run(tiles), 3, 50)
                except Exception as error:  # noqa: BLE001 - a shape that does not fit is skipped
                    print(f"{name} {tiles}: {type(error).__name__}"[:160])
                    continue
                results.append((us, tiles))
            best = min(results, key=lambda r: r[0])[0]
            for us, t in results:
                mark = " **best**" if us == best else ""
                print(
                    f"| {tokens} | {name} | {t.block_n} | {t.block_k} | {t.num_warps} |"
                    f" {t.num_stages} | {us:.1f}{mark} | {weight_bytes / us / 1e3:,.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
