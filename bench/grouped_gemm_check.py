"""GPU check of kernels/grouped_gemm.gmm (torch._grouped_mm) at BlackMamba's expert shapes.

For fresh random bf16 inputs with uneven group sizes (Sinkhorn balances, but not exactly), it
reports ‖out − ref‖/‖ref‖ of the output and both input gradients against a float64 per-expert
reference, and the median forward+backward time of the grouped kernel vs a loop of per-expert
matmuls (what SequentialMLP launches), side by side. A second table times the experts' weight
gradients summed into fp32 main grads: the Triton kernel training uses (group ends on the device,
kernels/grouped_wgrad_triton.py) vs one cuBLAS ``addmm(out_dtype=fp32)`` per expert (sizes on the
host), with the kernel's error against float64, and against CUTLASS's grouped GEMM of the same
weight gradients (``torch._grouped_mm`` with offsets along the token dimension) writing bf16 and
adding nothing: how far the fp32 accumulation and the kernel stand from that GEMM alone. On
Hopper a third table puts the fp8 forward GEMM of training.fp8 beside the bf16 one.

    python bench/grouped_gemm_check.py [--tokens 16384] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys

import torch
from harness import device_line  # also puts the repo on sys.path

from megatron_blackmamba.kernels import fp8
from megatron_blackmamba.kernels.grouped_gemm import accumulate_wgrad, gmm

SHAPES = {"fc1 (geglu)": (1152, 2 * 3072), "fc2": (3072, 1152)}


def loop_gmm(a, b, sizes):
    return torch.cat([x @ w for x, w in zip(torch.split(a, sizes.tolist()), b)])


def rel(got, want) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


def addmm_wgrad(main, a, dy, sizes):
    """The per-expert cuBLAS weight gradient into fp32 (needs the sizes on the host)."""
    start = 0
    for e, rows in enumerate(sizes.tolist()):
        if rows:
            torch.addmm(
                main[e],
                a[start : start + rows].t(),
                dy[start : start + rows],
                out_dtype=torch.float32,
                out=main[e],
            )
        start += rows


def wgrad_table(sizes, experts: int, tokens: int, g) -> None:
    import triton.testing

    print(
        "| weight gradient into fp32 | rel err | Triton ms | cuBLAS per expert ms | Triton TFLOP/s"
        " | cuBLAS/Triton | CUTLASS grouped, bf16, no add ms | CUTLASS/Triton |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        a = torch.randn(tokens, k, device="cuda", generator=g, dtype=torch.bfloat16)
        dy = torch.randn(tokens, n, device="cuda", generator=g, dtype=torch.bfloat16)
        main = torch.randn(experts, k, n, device="cuda", generator=g)
        want = main.double()
        start = 0
        for e, rows in enumerate(sizes.tolist()):
            want[e] += a[start : start + rows].double().t() @ dy[start : start + rows].double()
            start += rows
        device_sizes = sizes.cuda()
        accumulate_wgrad(main, a, dy, device_sizes)
        err = rel(main, want)
        t_triton = triton.testing.do_bench(
            lambda: accumulate_wgrad(main, a, dy, device_sizes),
            warmup=20,
            rep=200,
            return_mode="median",
        )
        t_cublas = triton.testing.do_bench(
            lambda: addmm_wgrad(main, a, dy, sizes), warmup=20, rep=200, return_mode="median"
        )
        ends = torch.cumsum(device_sizes, 0, dtype=torch.int32)
        t_cutlass = triton.testing.do_bench(
            lambda: torch._grouped_mm(a.t(), dy, offs=ends),
            warmup=20,
            rep=200,
            return_mode="median",
        )
        print(
            f"| {name} {tokens}x{k}x{n} | {err:.1e} | {t_triton:.3f} | {t_cublas:.3f} |"
            f" {2 * tokens * k * n / t_triton / 1e9:.0f} | {t_cublas / t_triton:.2f}x |"
            f" {t_cutlass:.3f} | {t_cutlass / t_triton:.2f}x |"
        )


def fp8_table(sizes, experts: int, tokens: int, g) -> None:
    """The forward grouped GEMM in bf16 (torch._grouped_mm) vs fp8 (torch._scaled_grouped_mm) at
    each recipe: the fp8 GEMM alone on operands already in e4m3, and with the quantisation of
    the activations that training.fp8 pays per GEMM (kernels/fp8.py). The weights' quantisation
    is paid once per optimizer step (grouped_gemm.refresh_fp8_weights), not per GEMM."""
    import triton.testing

    print(
        "| forward GEMM | recipe | rel err vs f64 | bf16 ms | fp8 GEMM ms | quantise a ms |"
        " quantise b ms (per step) | bf16 / fp8 GEMM | bf16 / (fp8 + quantise a) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ends = torch.cumsum(sizes.cuda(), 0, dtype=torch.int32)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")

    for name, (k, n) in SHAPES.items():
        a = torch.randn(tokens, k, device="cuda", generator=g, dtype=torch.bfloat16)
        b = torch.randn(experts, k, n, device="cuda", generator=g, dtype=torch.bfloat16) * k**-0.5
        ref = loop_gmm(a.double(), b.double(), sizes)
        t_bf16 = bench(lambda: torch._grouped_mm(a, b, offs=ends))
        for recipe in fp8.RECIPES:
            a8, scale_a = fp8.quantize_rows(a, recipe)
            b8, scale_b = fp8.quantize_k_major(b, recipe)

            def gemm():
                return torch._scaled_grouped_mm(
                    a8, b8, scale_a, scale_b, offs=ends, out_dtype=torch.bfloat16
                )

            t_gemm = bench(gemm)
            t_qa = bench(lambda: fp8.quantize_rows(a, recipe))
            t_qb = bench(lambda: fp8.quantize_k_major(b, recipe))
            print(
                f"| {name} {tokens}x{k}x{n} | {recipe} | {rel(gemm(), ref):.1e} | {t_bf16:.3f} |"
                f" {t_gemm:.3f} | {t_qa:.3f} | {t_qb:.3f} | {t_bf16 / t_gemm:.2f}x |"
                f" {t_bf16 / (t_gemm + t_qa):.2f}x |"
            )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=16384, help="routed tokens (micro-batch 8 x 2048)")
    p.add_argument("--experts", type=int, default=8, help="number of experts")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    if args.dry_run:
        print(f"shapes {SHAPES}, tokens {args.tokens}, experts {args.experts}")
        return 0
    import triton.testing

    print(device_line())
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.rand(args.experts, device="cuda", generator=g) + 0.5
    sizes = torch.floor(weights / weights.sum() * args.tokens).long()
    sizes[-1] += args.tokens - sizes.sum()
    sizes = sizes.cpu()
    print("group sizes", sizes.tolist())
    print("| GEMM | rel err out | grad a | grad b | grouped ms | loop ms | loop/grouped |")
    print("|---|---|---|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        a = torch.randn(
            args.tokens, k, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True
        )
        b = (
            torch.randn(args.experts, k, n, device="cuda", generator=g, dtype=torch.bfloat16)
            * k**-0.5
        ).requires_grad_()
        up = torch.randn(args.tokens, n, device="cuda", generator=g, dtype=torch.bfloat16)
        out = gmm(a, b, sizes)
        out.backward(up)
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = loop_gmm(a64, b64, sizes)
        ref.backward(up.double())
        errs = rel(out, ref), rel(a.grad, a64.grad), rel(b.grad, b64.grad)

        def run(fn):
            a.grad = b.grad = None
            fn(a, b, sizes).backward(up)

        t_grouped = triton.testing.do_bench(
            lambda: run(gmm), warmup=50, rep=300, return_mode="median"
        )
        t_loop = triton.testing.do_bench(
            lambda: run(loop_gmm), warmup=50, rep=300, return_mode="median"
        )
        flag = "" if max(errs) < 2e-2 else " HIGH"
        print(
            f"| {name} {args.tokens}x{k}x{n} | {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e}{flag}"
            f" | {t_grouped:.3f} | {t_loop:.3f} | {t_loop / t_grouped:.2f}x |"
        )
    print()
    wgrad_table(sizes, args.experts, args.tokens, g)
    if fp8.fp8_blocker() is None:
        print()
        fp8_table(sizes, args.experts, args.tokens, g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
