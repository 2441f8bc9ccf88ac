"""Training throughput of BlackMamba and its baselines, measured side by side in one process.

For each variant (bench/harness.py): tokens/s, step time, MFU (model FLOPs on active parameters
over the bf16 datasheet peak; see training/flops.py and gpt_baseline.train_flops_per_token) and
peak memory, over real megatron training steps (DDP, optimizer, schedules) on synthetic tokens.
Ratios are against the first row. Use a global batch of several micro-batches to amortise
the optimizer step as a real run does. On one GPU each variant runs in its own process, one after
the other, and the parent prints the table.

``--seq-lengths`` repeats every variant at each sequence length with the config's tokens per
micro-batch and per step (micro and global batch scaled down as the sequence grows), so a row's
"vs shortest" is the cost of length alone: a Mamba stack is linear in it, attention is not.

    python bench/train_throughput.py --config configs/blackmamba-340m-1.5b.yaml --steps 6 \
        parallel.ep=1 training.micro_batch_size=4 training.global_batch_size=32
    python bench/train_throughput.py --variants blackmamba-grouped,gpt-dense \
        --seq-lengths 2048,8192,32768 --config configs/blackmamba-340m-1.5b.yaml \
        training.micro_batch_size=16 training.global_batch_size=64
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


@dataclass(frozen=True)
class Row:
    """One measurement of the plan: a variant with the overrides of its sequence length."""

    name: str
    variant: str
    overrides: tuple[str, ...]
    seq_length: int


def plan_rows(
    variants: list[str], config: str | None, overrides: list[str], seqs: str
) -> list[Row]:
    """Every variant at each of ``seqs`` (comma-separated; empty: the config's length only), with
    the config's tokens per micro-batch and per step; a length they do not divide is refused."""
    from megatron_blackmamba.config import load_config

    t = load_config(config, overrides).training
    if not seqs:
        return [Row(v, v, tuple(overrides), t.seq_length) for v in variants]
    micro, step = t.micro_batch_size * t.seq_length, t.global_batch_size * t.seq_length
    rows = []
    for seq in (int(s) for s in seqs.split(",")):
        if micro % seq:
            raise SystemExit(
                f"--seq-lengths: {seq} does not divide the {micro} tokens per micro-batch"
                " (training.micro_batch_size x training.seq_length); pick lengths that do"
            )
        scaled = [
            f"training.seq_length={seq}",
            f"training.micro_batch_size={micro // seq}",
            f"training.global_batch_size={step // seq}",
        ]
        rows += [Row(f"{v} seq {seq}", v, tuple(overrides + scaled), seq) for v in variants]
    return rows


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


def isolate(rows: list[Row]) -> bool:
    """One process per row on a single GPU: megatron's captured CUDA graphs
    (training.cuda_graphs) keep their model and memory pool alive for the rest of a process,
    which would leave the next row short of memory. Under torchrun every rank must run the same
    row in-process."""
    return torch.cuda.is_available() and len(rows) > 1 and "RANK" not in os.environ


def run_in_subprocess(row: Row, args) -> Result:
    """``row`` measured by this script in a fresh process; a failed run is a row of nan."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--variants",
            row.variant,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--result-json",
            str(out),
            *(["--config", args.config] if args.config else []),
            *row.overrides,
        ]
        done = subprocess.run(cmd)
        if done.returncode or not out.exists():
            print(f"{row.name}: failed (exit {done.returncode})", flush=True)
            return Result.missing(row.name)
        return dataclasses.replace(Result(**json.loads(out.read_text())), name=row.name)


def table(rows: list[Row], results: list[Result]) -> str:
    """Markdown; "vs shortest" (with several lengths): against the same variant's shortest row."""
    base = results[0].tokens_per_s
    sweep = len({row.seq_length for row in rows}) > 1
    shortest = {}
    for row, r in sorted(zip(rows, results), key=lambda pair: pair[0].seq_length, reverse=True):
        shortest[row.variant] = r.tokens_per_s
    extra = " vs shortest |" if sweep else ""
    lines = [
        "| variant | tokens/s | step s | MFU | peak GiB | loss | vs first |" + extra,
        "|---|---|---|---|---|---|---|" + ("---|" if sweep else ""),
    ]
    for row, r in zip(rows, results):
        line = (
            f"| {r.name} | {r.tokens_per_s:,.0f} | {r.step_s:.3f} | {100 * r.mfu:.1f}% | "
            f"{r.peak_gib:.1f} | {r.loss:.3f} | {r.tokens_per_s / base:.2f}x |"
        )
        if sweep:
            line += f" {r.tokens_per_s / shortest[row.variant]:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--seq-lengths",
        default="",
        help="comma-separated sequence lengths, each at the config's tokens per micro-batch"
        " (default: the config's length only)",
    )
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
    if args.result_json:  # one variant, for run_in_subprocess
        (name,) = names
        result = run_variant(name, args.config, args.overrides, args.steps, args.warmup)
        Path(args.result_json).write_text(json.dumps(dataclasses.asdict(result)))
        return 0
    rows = plan_rows(names, args.config, args.overrides, args.seq_lengths)
    if args.dry_run:
        for row in rows:
            v = VARIANTS[row.variant]
            print(
                f"{row.name}: kernels={v.kernels} scan={v.scan} model={v.model}"
                f" config={args.config} overrides={list(row.overrides) + list(v.overrides)}"
            )
        return 0
    results = []
    for row in rows:
        if isolate(rows):
            results.append(run_in_subprocess(row, args))
        else:
            try:
                result = run_variant(
                    row.variant, args.config, list(row.overrides), args.steps, args.warmup
                )
                results.append(dataclasses.replace(result, name=row.name))
            except torch.OutOfMemoryError as error:  # a row of nan; the next variant still runs
                print(f"{row.name}: out of memory: {str(error).splitlines()[0]}", flush=True)
                results.append(Result.missing(row.name))
                gc.collect()
                torch.cuda.empty_cache()
        print(f"{row.name}: {results[-1]}", flush=True)
    text = f"{device_line()}\nconfig {args.config} {' '.join(args.overrides)}\n" + table(
        rows, results
    )
    publish_table(args.out, "train_throughput.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
