"""GPU check of the MoE decode kernels (kernels/top1_experts_triton.py) at BlackMamba's expert
shapes, and a sweep of their launch shapes.

For 1, 8 and 64 tokens (decode batch sizes) routed at random over the 8 experts, it reports the
kernels' error against a float64 per-token reference and, per launch shape (outputs per program,
reduction step, warps, pipeline depth, reduction splits), each kernel's time per call and the
bandwidth it reaches on the weights of the experts the tokens chose (each read once). Calls are
replayed from a CUDA graph (launch gaps included, as in a decode step) and cycle through
``WEIGHT_SETS`` copies of the weights, so the chosen experts come from HBM, not the 50 MB L2.
The route kernel and the grouped-GEMM pair the dispatcher path runs for the same tokens
(torch._grouped_mm, the tokens sorted by expert) are timed beside them. The fastest shape per
kernel and token count is marked: what ``tiles_for`` should pick.

    python bench/top1_experts_check.py [--dry-run]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable

import torch
from harness import device_line, device_ms, graph_replay_us, rel_err  # puts the repo on sys.path

from megatron_blackmamba.kernels.glu import glu_with_probs_torch
from megatron_blackmamba.kernels.grouped_gemm import gmm
from megatron_blackmamba.kernels.top1_experts import top1_expert_mlp_torch, top1_route_torch

HIDDEN, WIDTH, EXPERTS = 1152, 3072, 8
TOKENS = (1, 8, 64)
WEIGHT_SETS = 4  # 4 x 170 MB of experts: a call's experts were evicted by the three before it
# (block_n, block_k, warps, stages, splits) tried per kernel; fc2's reduction split for the few
# tokens that leave most SMs idle
SHAPES = {
    "fc1": [
        (n, k, w, st, 1)
        for n, k, w, st in itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 4))
    ],
    "fc2": [
        (n, k, 4, st, sp)
        for n, k, st, sp in itertools.product((32, 64, 128), (128, 256), (3, 4), (1, 2, 4, 8))
    ],
}


def weight_sets(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(WEIGHT_SETS):
        w1 = torch.randn(EXPERTS, HIDDEN, 2 * WIDTH, device="cuda", generator=g) / 34
        w2 = torch.randn(EXPERTS, WIDTH, HIDDEN, device="cuda", generator=g) / 55
        sets.append((w1.bfloat16(), w2.bfloat16()))
    return sets


def graph_us(run: Callable[[int], object]) -> float:
    """Microseconds per call of ``run(i)``, i cycling through the weight sets."""
    return graph_replay_us(run, WEIGHT_SETS)


def grouped_pair(x, expert, p, w1, w2):
    """The dispatcher path's expert compute for the same tokens: sort, two grouped GEMMs
    (kernels/grouped_gemm.gmm, torch._grouped_mm here) around the gated activation."""
    order = torch.argsort(expert)
    sizes = torch.bincount(expert, minlength=EXPERTS)
    h = glu_with_probs_torch(gmm(x[order], w1, sizes), p[order, None], "gelu")
    return gmm(h, w2, sizes)


def sweep(name: str, run: Callable, tokens: int, weight_bytes: int, kernels) -> object:
    """One table row per launch shape; returns the fastest Tiles."""
    results = []
    for shape in SHAPES[name]:
        tiles = kernels.Tiles(*shape)
        try:
            us = graph_us(lambda i: run(i, tiles))
        except Exception as error:  # noqa: BLE001 - a shape that does not fit is skipped
            print(f"{name} {tiles}: {type(error).__name__}"[:160])
            torch.cuda.synchronize()
            continue
        results.append((us, tiles))
    best = min(results, key=lambda r: r[0])[1]
    for us, t in results:
        mark = " **best**" if t == best else ""
        print(
            f"| {tokens} | {name} | {t.block_n} | {t.block_k} | {t.num_warps} | {t.num_stages} |"
            f" {t.splits} | {us:.1f}{mark} | {weight_bytes / us / 1e3:,.0f} |",
            flush=True,
        )
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    if args.dry_run:
        shapes = {name: len(s) for name, s in SHAPES.items()}
        print(f"tokens {TOKENS}; launch shapes per kernel {shapes}; H {HIDDEN} F {WIDTH}")
        return 0
    from megatron_blackmamba.kernels import top1_experts_triton as kernels

    print(device_line())
    weights = weight_sets(seed=0)
    router = torch.randn(EXPERTS, HIDDEN, device="cuda").bfloat16()
    router_bias = torch.randn(EXPERTS, device="cuda").bfloat16()
    print(
        "| tokens | kernel | block_n | block_k | warps | stages | splits | us per call |"
        " weights GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in TOKENS:
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16()
        expert = torch.randint(0, EXPERTS, (tokens,), device="cuda", generator=g)
        prob = torch.rand(tokens, device="cuda", generator=g)
        chosen = int(torch.unique(expert).numel())
        w1, w2 = weights[0]
        want = top1_expert_mlp_torch(
            x.double(), expert, prob.double(), w1.double(), w2.double(), "gelu", True
        )
        got = kernels.top1_expert_mlp(x, expert, prob, w1, w2, silu=False, gated=True)
        default_us = graph_us(
            lambda i: kernels.top1_expert_mlp(x, expert, prob, *weights[i], False, True)
        )
        # its host-side sizes keep the grouped GEMM out of a graph: kernel time only
        grouped_us = 1e3 * device_ms(lambda: grouped_pair(x, expert, prob, w1, w2), 5, 50)
        torch_route_us = graph_us(lambda i: top1_route_torch(x, router, router_bias, None))
        route_us = graph_us(lambda i: kernels.route(x, router, router_bias, None))
        print(
            f"tokens {tokens} ({chosen} experts chosen): error vs float64 {rel_err(got, want):.2e};"
            f" tiles_for's pair {default_us:.1f} us, grouped-GEMM pair {grouped_us:.1f} us"
            f" (kernel time); route kernel {route_us:.1f} us, PyTorch route {torch_route_us:.1f} us"
        )
        if tokens == TOKENS[-1]:
            continue  # wide unsplit tiles already saturate the SMs here (h200_decode_moe.md)
        best1 = sweep(
            "fc1",
            lambda i, t: kernels.fc1(x, expert, prob, weights[i][0], False, True, t),
            tokens,
            chosen * HIDDEN * 2 * WIDTH * 2,
            kernels,
        )
        h = kernels.fc1(x, expert, prob, w1, False, True, best1)
        sweep(
            "fc2",
            lambda i, t: kernels.fc2(h, expert, weights[i][1], t),
            tokens,
            chosen * WIDTH * HIDDEN * 2,
            kernels,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
