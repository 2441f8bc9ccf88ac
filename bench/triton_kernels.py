"""This project's Triton kernels against what megatron-core runs in their place, side by side in
one run, at one micro-batch of the 340M config (16 x 2048 = 32768 tokens, 8 experts, expert width
3072, GeGLU, vocabulary 50304):

* the Sinkhorn routing plan of [T, E] fp32 logits: the torch loop and the Triton launches
  (kernels/sinkhorn_triton.py), each eager and replayed from a CUDA graph as the router runs it
  in training (model/sinkhorn.sinkhorn_replayed), with the iterations run;
* the experts' gated activation x routing probability over [T, 2F] bf16: the expression megatron's
  GroupedMLP compiles with torch.compile, and kernels/glu.py's Triton kernels;
* the language-model cross-entropy over [T, V] bf16 logits: megatron's vocab-parallel
  cross-entropy and kernels/cross_entropy.py's;
* the block RMSNorm over [T, H] bf16: torch's fused RMSNorm (what megatron's WrappedTorchNorm runs
  without Transformer Engine) and kernels/rms_norm.py's.

Forward and forward+backward times (medians of CUDA-event timings, which include the host's launch
time where launching is slower than the kernels) and the forward+backward GPU work alone (profiler
kernel times, what a GPU-bound training step pays), against the floor of the HBM bytes at
--bandwidth; every row gives ||out - ref|| / ||ref|| against float64 (for the backward,
the largest over the input gradients; the cross-entropy's on its first --ref-rows rows).

    python bench/triton_kernels.py [--tokens 32768] [--experts 8] [--ffn 3072] [--vocab 50304]
                                   [--hidden 1152] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from harness import (
    device_line,
    device_ms,
    publish_table,
    rel_err,
    time_ms,
)  # noqa: I001  (puts the repo on sys.path)

from megatron_blackmamba.config import ModelConfig, load_config
from megatron_blackmamba.cuda_graph import capture
from megatron_blackmamba.kernels.cross_entropy import vocab_parallel_cross_entropy
from megatron_blackmamba.kernels.glu import glu_with_probs
from megatron_blackmamba.kernels.rms_norm import rms_norm
from megatron_blackmamba.model.sinkhorn import sinkhorn, sinkhorn_fused
from megatron_blackmamba.parallel.setup import init_distributed

HEADER = [
    (
        "| op | implementation | fwd ms | fwd+bwd ms | fwd+bwd GPU work ms | bytes floor ms (fwd /"
        " fwd+bwd) | rel err vs fp64 | note |"
    ),
    "|---|---|---|---|---|---|---|---|",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokens", type=int, default=32768, help="tokens per micro-batch (rows of both ops)"
    )
    p.add_argument("--experts", type=int, default=8, help="columns of the Sinkhorn cost matrix")
    p.add_argument(
        "--ffn", type=int, default=3072, help="expert width F (the activation reads [T, 2F])"
    )
    p.add_argument(
        "--vocab", type=int, default=50304, help="vocabulary of the cross-entropy's logits"
    )
    p.add_argument("--hidden", type=int, default=1152, help="width H of the RMSNorm's rows")
    p.add_argument(
        "--ref-rows",
        type=int,
        default=1024,
        help="rows of the cross-entropy checked against float64",
    )
    p.add_argument("--logit-std", type=float, default=1.0, help="std of the random router logits")
    p.add_argument(
        "--bandwidth", type=float, default=3.0e12, help="HBM bytes/s for the floors (H100: ~3.0e12)"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed calls per row (median reported)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls first (compiles, graph capture)"
    )
    p.add_argument(
        "--out", default=os.environ.get("OUT", ""), help="folder for the table (default: $OUT)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p.parse_args(argv)


def timings(fwd, fwd_bwd, args: argparse.Namespace) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms) by CUDA events, and the forward+backward's GPU work."""
    return (
        time_ms(fwd, args.warmup, args.repeats),
        time_ms(fwd_bwd, args.warmup, args.repeats),
        device_ms(fwd_bwd, args.warmup, args.repeats),
    )


def sinkhorn_rows(args: argparse.Namespace) -> list[str]:
    m = ModelConfig()
    kwargs = dict(
        temperature=m.sinkhorn_temperature,
        init=m.sinkhorn_init,
        tol=m.sinkhorn_tol,
        max_iters=m.sinkhorn_max_iters,
    )
    logits = args.logit_std * torch.randn(args.tokens, args.experts, device="cuda")
    want = sinkhorn(logits.double(), **kwargs)
    solvers = {}
    for name, solver in (("torch loop", sinkhorn), ("Triton launches", sinkhorn_fused)):
        graph, graphed = capture(lambda solver=solver: solver(logits, **kwargs), logits.device)
        solvers[f"{name}, eager"] = lambda solver=solver: solver(logits, **kwargs)
        solvers[f"{name}, CUDA graph (as trained)"] = lambda graph=graph, graphed=graphed: (
            graph.replay(),
            graphed,
        )[1]
    rows = []
    for name, solve in solvers.items():
        ms = time_ms(solve, args.warmup, args.repeats)
        gpu_ms = device_ms(solve, args.warmup, args.repeats)
        got = solve()
        err = rel_err(got.plan, want.plan)
        rows.append(
            f"| sinkhorn [{args.tokens}, {args.experts}] | {name} | {ms:.3f} | | {gpu_ms:.3f} | |"
            f" {err:.1e} | {int(got.iterations)} iterations (fp64: {int(want.iterations)}); no"
            " backward: GPU work of the forward |"
        )
    return rows


def megatron_glu(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """GroupedMLP.activation_func_with_probs with its glu, as megatron-core 0.16.1 writes them."""
    gate, value = torch.chunk(x, 2, dim=-1)
    return (F.gelu(gate) * value * probs).to(x.dtype)


def glu_rows(args: argparse.Namespace) -> list[str]:
    T, Fw = args.tokens, args.ffn
    x = torch.randn(T, 2 * Fw, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probs = torch.rand(T, 1, device="cuda", requires_grad=True)
    dy = torch.randn(T, Fw, device="cuda", dtype=torch.bfloat16)
    x64, p64 = x.detach().double().requires_grad_(), probs.detach().double().requires_grad_()
    gate, value = x64.chunk(2, dim=-1)
    want = F.gelu(gate) * value * p64
    want.backward(dy.double())
    impls = {
        "megatron (torch.compile)": torch.compile(megatron_glu),
        "kernels/glu.py (Triton)": glu_with_probs,
    }
    io = 2  # bytes per bf16 element
    floor_fwd = T * 3 * Fw * io / args.bandwidth * 1e3  # read [T, 2F], write [T, F]
    floor_bwd = (
        T * 5 * Fw * io / args.bandwidth * 1e3
    )  # read [T, 2F] and dy [T, F], write dx [T, 2F]
    rows = []
    for name, fn in impls.items():

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(x, probs), (x, probs), dy)

        fwd_ms, both_ms, gpu_ms = timings(lambda fn=fn: fn(x, probs), fwd_bwd, args)
        y = fn(x, probs)
        dx, dp = fwd_bwd()
        err_y = rel_err(y, want.detach())
        err_grad = max(rel_err(dx, x64.grad), rel_err(dp, p64.grad))
        rows.append(
            f"| gelu(x1) * x2 * p [{T}, {2 * Fw}] bf16 | {name} | {fwd_ms:.3f} | {both_ms:.3f} |"
            f" {gpu_ms:.3f} | {floor_fwd:.3f} / {floor_fwd + floor_bwd:.3f} | y {err_y:.1e}, grads"
            f" {err_grad:.1e} | |"
        )
    return rows


def cross_entropy_rows(args: argparse.Namespace) -> list[str]:
    from megatron.core import tensor_parallel

    T, V = args.tokens, args.vocab
    logits = (3 * torch.randn(T, 1, V, device="cuda")).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (T, 1), device="cuda")
    dloss = torch.randn(T, 1, device="cuda")
    R = min(args.ref_rows, T)
    x64 = logits[:R].detach().double().requires_grad_()
    want = torch.logsumexp(x64, dim=-1) - x64.gather(-1, labels[:R, :, None])[..., 0]
    want.backward(dloss[:R].double())
    impls = {
        "megatron vocab_parallel_cross_entropy": tensor_parallel.vocab_parallel_cross_entropy,
        "kernels/cross_entropy.py (Triton)": vocab_parallel_cross_entropy,
    }
    floor_fwd = T * V * 2 / args.bandwidth * 1e3  # read the bf16 logits
    rows = []
    for name, fn in impls.items():

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(logits, labels), logits, dloss)

        fwd_ms, both_ms, gpu_ms = timings(lambda fn=fn: fn(logits, labels), fwd_bwd, args)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        extra_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        part = logits[:R].detach().requires_grad_()
        loss = fn(part, labels[:R])
        (grad,) = torch.autograd.grad(loss, part, dloss[:R])
        rows.append(
            f"| cross-entropy [{T}, {V}] bf16 | {name} | {fwd_ms:.3f} | {both_ms:.3f} |"
            f" {gpu_ms:.3f} | {floor_fwd:.3f} / {3 * floor_fwd:.3f} | loss"
            f" {rel_err(loss, want.detach()):.1e}, grad {rel_err(grad, x64.grad):.1e} |"
            f" {extra_gib:.1f} GiB above the logits |"
        )
    return rows


def rms_norm_rows(args: argparse.Namespace) -> list[str]:
    T, H, eps = args.tokens, args.hidden, 1e-5
    x = (3 * torch.randn(T, H, device="cuda")).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    want.backward(dy.double())
    impls = {
        "torch F.rms_norm (megatron without TE)": lambda x, w: F.rms_norm(x, (H,), w, eps),
        "kernels/rms_norm.py (Triton)": lambda x, w: rms_norm(x, w, eps),
    }
    floor_fwd = T * H * 2 * 2 / args.bandwidth * 1e3  # read x, write y (bf16)
    floor_bwd = T * H * 3 * 2 / args.bandwidth * 1e3  # read x and dy, write dx
    rows = []
    for name, fn in impls.items():

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(x, w), (x, w), dy)

        fwd_ms, both_ms, gpu_ms = timings(lambda fn=fn: fn(x, w), fwd_bwd, args)
        y = fn(x, w)
        dx, dw = fwd_bwd()
        err_grad = max(rel_err(dx, x64.grad), rel_err(dw, w64.grad))
        rows.append(
            f"| rms_norm [{T}, {H}] bf16 | {name} | {fwd_ms:.3f} | {both_ms:.3f} | {gpu_ms:.3f} | "
            f"{floor_fwd:.3f} / {floor_fwd + floor_bwd:.3f} | y {rel_err(y, want.detach()):.1e}, "
            f"grads {err_grad:.1e} | |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = (
        f"triton kernels: sinkhorn [{args.tokens}, {args.experts}] (torch / Triton, eager / graph);"
        f" gated activation [{args.tokens}, {2 * args.ffn}] bf16 (megatron compiled, Triton);"
        f" cross-entropy [{args.tokens}, {args.vocab}] bf16 (megatron, Triton); rms_norm"
        f" [{args.tokens}, {args.hidden}] bf16 (torch, Triton); median of {args.repeats} after"
        f" {args.warmup} warm-up"
    )
    if args.dry_run:
        print(plan)
        return 0
    if not torch.cuda.is_available():
        print("triton_kernels: no CUDA device (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    init_distributed(
        load_config(None, []).parallel, seed=0
    )  # megatron's cross-entropy reads the TP group
    torch.manual_seed(0)
    text = "\n".join(
        [
            plan,
            device_line(),
            *HEADER,
            *sinkhorn_rows(args),
            *glu_rows(args),
            *cross_entropy_rows(args),
            *rms_norm_rows(args),
        ]
    )
    publish_table(args.out, "triton_kernels.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
