"""Training throughput of BlackMamba variants, measured side by side in one process.

For each variant: tokens/s, step time, MFU (active-parameter FLOPs, see training/flops.py) and peak
memory, over real megatron training steps (DDP, optimizer, schedules) on synthetic tokens. Ratios
are against the first variant. Variants (``--variants``):

  blackmamba-cuda   the model with mamba-ssm / causal-conv1d kernels
  blackmamba-torch  the same model with the PyTorch scan and conv (BLACKMAMBA_KERNEL_BACKEND=torch)
  dense-mamba       an all-Mamba stack with about the same active parameters (no MoE)

    python bench/train_throughput.py --config configs/blackmamba-340m-1.5b.yaml --steps 6
    python bench/train_throughput.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {
    "blackmamba-cuda": ("cuda", []),
    "blackmamba-torch": ("torch", []),
    # 34 Mamba layers at hidden 1152 ~ the 340M active of BlackMamba-340M/1.5B.
    "dense-mamba": ("cuda", ["model.layer_pattern=" + "M" * 34, "model.num_layers=34"]),
}


@dataclass
class Result:
    name: str
    tokens_per_s: float
    step_s: float
    mfu: float
    peak_gib: float
    loss: float


def synthetic_batches(vocab: int, mbs: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq)}


def run_variant(name: str, config: Optional[str], overrides: list[str], steps: int, warmup: int) -> Result:
    from megatron.core import parallel_state

    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.parallel.setup import init_distributed
    from megatron_blackmamba.training.flops import device_peak_tflops, train_flops_per_token
    from megatron_blackmamba.training.setup import build_ddp_model, build_optimizer, num_microbatches
    from megatron_blackmamba.training.step import train_step

    backend, extra = VARIANTS[name]
    os.environ["BLACKMAMBA_KERNEL_BACKEND"] = backend
    job = load_config(config, overrides + extra)
    init_distributed(job.parallel, job.training.seed)
    t = job.training
    model = build_ddp_model(job)
    optimizer = build_optimizer(job, model)
    n_micro = num_microbatches(job, parallel_state.get_data_parallel_world_size())
    batches = synthetic_batches(job.model.vocab_size, t.micro_batch_size, t.seq_length)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for step in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _, _ = train_step(model, optimizer, batches, n_micro, t.seq_length, t.micro_batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_s = t.global_batch_size * t.seq_length / step_s
    peak, _ = device_peak_tflops(job.logging.peak_tflops)
    mfu = tokens_per_s * train_flops_per_token(job.model) / (peak * 1e12) if peak else 0.0
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Result(name, tokens_per_s, step_s, mfu, peak_gib, loss)


def table(results: list[Result]) -> str:
    base = results[0].tokens_per_s
    lines = ["| variant | tokens/s | step s | MFU | peak GiB | loss | vs first |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.tokens_per_s:,.0f} | {r.step_s:.3f} | {100 * r.mfu:.1f}% | "
                     f"{r.peak_gib:.1f} | {r.loss:.3f} | {r.tokens_per_s / base:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="base config (default: built-in 340M/1.5B defaults)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder to write the table to")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    if args.dry_run:
        for name in names:
            backend, extra = VARIANTS[name]
            print(f"{name}: kernels={backend} config={args.config} overrides={args.overrides + extra}")
        return 0
    results = []
    for name in names:
        from megatron_blackmamba.parallel.setup import destroy

        results.append(run_variant(name, args.config, args.overrides, args.steps, args.warmup))
        destroy()
        print(f"{name}: {results[-1]}", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    text = f"device: {device}, torch {torch.__version__}\n" + table(results)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_throughput.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
