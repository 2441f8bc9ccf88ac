"""GPU check of the whole Mamba-1 mixer (channels-major projections + CUDA kernels).

Builds the megatron Mamba1Mixer in fp32 on the GPU, and on fresh random inputs compares output
and input/weight gradients of the CUDA-kernel path against the PyTorch-kernel path on the same
module, and the output against the float64 step-by-step Mamba-1 of tests/model (on a short
sequence: that reference loops over time in Python). Also checks prefill + decode == full forward.

    python bench/mixer_gpu_check.py [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from harness import device_line  # also puts the repo (and so tests/) on sys.path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_mixer(mixer, x: torch.Tensor, upstream: torch.Tensor, backend: str):
    os.environ["BLACKMAMBA_KERNEL_BACKEND"] = backend
    mixer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, _ = mixer(x)
    out.backward(upstream)
    grads = {n: p.grad.detach().clone() for n, p in mixer.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args()
    if args.dry_run:
        print(
            "mixer: cuda vs torch kernels (hidden 1152, seq 512, batch 2, fp32) and vs float64"
            " (hidden 64, seq 24)"
        )
        return 0
    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.model.recurrent_state import RecurrentState
    from megatron_blackmamba.parallel.setup import destroy, init_distributed
    from tests.model.test_mamba1_mixer import _mixer, reference_mamba1

    print(device_line())
    init_distributed(load_config(None, []).parallel, seed=0)
    worst = 0.0
    print("| check | rel err |\n|---|---|")
    torch.manual_seed(1)
    mixer = _mixer(1152, 16).cuda()
    x = torch.randn(512, 2, 1152, device="cuda")
    upstream = torch.randn_like(x)
    out_c, dx_c, g_c = run_mixer(mixer, x, upstream, "cuda")
    out_t, dx_t, g_t = run_mixer(mixer, x, upstream, "torch")
    rows = [("out cuda vs torch", rel(out_c, out_t)), ("grad x cuda vs torch", rel(dx_c, dx_t))]
    rows += [(f"grad {n} cuda vs torch", rel(g_c[n], g_t[n])) for n in g_t]
    small = _mixer(64, 16).cuda()
    xs = torch.randn(24, 2, 64, device="cuda")
    os.environ["BLACKMAMBA_KERNEL_BACKEND"] = "cuda"
    with torch.no_grad():
        out_s, _ = small(xs)
        rows.append(
            ("out cuda vs float64 loop", rel(out_s.cpu(), reference_mamba1(xs.cpu(), small.cpu())))
        )
        small.cuda().eval()
        state = RecurrentState(max_batch_size=2, max_sequence_length=64)
        prefix, _ = small(xs[:10], inference_context=state)
        state.sequence_len_offset = 10
        steps = []
        for t in range(10, 24):
            y, _ = small(xs[t : t + 1], inference_context=state)
            state.sequence_len_offset += 1
            steps.append(y)
        rows.append(("prefill+decode vs full (cuda)", rel(torch.cat([prefix, *steps]), out_s)))
    for name, err in rows:
        worst = max(worst, err)
        print(f"| {name} | {err:.1e}{' HIGH' if err > 1e-4 else ''} |")
    destroy()
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
