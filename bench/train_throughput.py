"""Training throughput of BlackMamba and its baselines, measured side by side in one process.

For each variant (bench/harness.py): tokens/s, step time, MFU (model FLOPs on active parameters
over the bf16 datasheet peak; see training/flops.py and gpt_baseline.train_flops_per_token) and
peak memory, over real megatron training steps (DDP, optimizer, schedules) on synthetic tokens.
Ratios are against the first variant. Use a global batch of several micro-batches to amortise
the optimizer step as a real run does. On one GPU each variant runs in its own process, one after
the other, and the parent prints the table.

    python bench/train_throughput.py --config configs/blackmamba-340m-1.5b.yaml --steps 6 \
        parallel.ep=1 training.micro_batch_size=4 training.global_batch_size=32
    python bench/train_throughput.py --dry-run
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import (
    VARIANTS,
    bench_parser,
    build_trainer,
    check_variants,
    device_line,
    median_seconds,
    publish_table,
    release,
)

from megatron_blackmamba.training.flops import device_peak_tflops


@dataclass
class Result:
    name: str
    tokens_per_s: float
    step_s: float
    mfu: float
    peak_gib: float
    loss: float

    @classmethod
    def missing(cls, name: str) -> "Result":
        """A row of nan for a variant that could not be measured; the table still prints."""
        return cls(name, *[float("nan")] * 5)


def run_variant(
    name: str, config: str | None, overrides: list[str], steps: int, warmup: int
) -> Result:
    trainer = build_trainer(name, config, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_s, loss = median_seconds(trainer.step, steps, warmup)
    tokens_per_s = trainer.tokens_per_step / step_s
    peak, _ = device_peak_tflops(trainer.job.logging.peak_tflops)
    gpus = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mfu = tokens_per_s * trainer.flops_per_token / (gpus * peak * 1e12) if peak else 0.0  # per GPU
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    release(trainer)
    return Result(name, tokens_per_s, step_s, mfu, peak_gib, loss)


def isolate(names: list[str]) -> bool:
    """One process per variant on a single GPU: megatron's captured CUDA graphs
    (training.cuda_graphs)
    keep their model and memory pool alive for the rest of a process, which would leave the next
    variant short of memory. Under torchrun every rank must run the same variant in-process."""
    return torch.cuda.is_available() and len(names) > 1 and "RANK" not in os.environ


def run_in_subprocess(name: str, args) -> Result:
    """``name`` measured by this script in a fresh process; a failed run is a row of nan."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--variants",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--result-json",
            str(out),
            *(["--config", args.config] if args.config else []),
            *args.overrides,
        ]
        done = subprocess.run(cmd)
        if done.returncode or not out.exists():
            print(f"{name}: failed (exit {done.returncode})", flush=True)
            return Result.missing(name)
        return Result(**json.loads(out.read_text()))


def table(results: list[Result]) -> str:
    base = results[0].tokens_per_s
    lines = [
        "| variant | tokens/s | step s | MFU | peak GiB | loss | vs first |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.tokens_per_s:,.0f} | {r.step_s:.3f} | {100 * r.mfu:.1f}% | "
            f"{r.peak_gib:.1f} | {r.loss:.3f} | {r.tokens_per_s / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--result-json",
        default="",
        help=(
            "measure the one variant and write its result here (used per variant by the isolating"
            " parent)"
        ),
    )
    args = p.parse_args()
    names = args.variants.split(",")
    check_variants(names)
    if args.dry_run:
        for name in names:
            v = VARIANTS[name]
            print(
                f"{name}: kernels={v.kernels} scan={v.scan} gpt={v.gpt} config={args.config}"
                f" overrides={args.overrides + list(v.overrides)}"
            )
        return 0
    if args.result_json:  # one variant, for run_in_subprocess
        (name,) = names
        result = run_variant(name, args.config, args.overrides, args.steps, args.warmup)
        Path(args.result_json).write_text(json.dumps(dataclasses.asdict(result)))
        return 0
    results = []
    for name in names:
        if isolate(names):
            results.append(run_in_subprocess(name, args))
        else:
            try:
                results.append(
                    run_variant(name, args.config, args.overrides, args.steps, args.warmup)
                )
            except (
                torch.OutOfMemoryError
            ) as error:  # reported as a row of nan; the next variant still runs
                print(f"{name}: out of memory: {str(error).splitlines()[0]}", flush=True)
                results.append(Result.missing(name))
                gc.collect()
                torch.cuda.empty_cache()
        print(f"{name}: {results[-1]}", flush=True)
    text = f"{device_line()}\nconfig {args.config} {' '.join(args.overrides)}\n" + table(results)
    publish_table(args.out, "train_throughput.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
