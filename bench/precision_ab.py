"""Loss curves of the same training run at each training.fp8 setting, side by side.

Each setting trains the config (same seed, same data order, same initial weights) through the
real trainer (``python -m megatron_blackmamba.train``), one after the other in one call, and the
table puts their losses at every ``--every`` steps next to each other, with the mean loss of the
last ``--tail`` steps against the first setting's and the tokens/s each reached. The question it
answers: does fp8 track bf16?

    python bench/precision_ab.py --config configs/blackmamba-340m-1.5b.yaml \
        --settings none,rowwise parallel.ep=1 training.micro_batch_size=16 \
        training.global_batch_size=16 training.train_iters=300 training.warmup_iters=30 \
        training.eval_interval=0 data.blend=sample data.tokenizer= checkpoint.save=
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import bench_parser, device_line, publish_table


def train_command(config: str | None, overrides: list[str], setting: str, metrics: Path) -> list:
    """The trainer's command line for one fp8 setting, its per-step metrics into ``metrics``."""
    return [
        sys.executable,
        "-m",
        "megatron_blackmamba.train",
        *(["--config", config] if config else []),
        *overrides,
        f"training.fp8={setting}",
        f"logging.metrics_jsonl={metrics}",
        "logging.tensorboard_dir=",
        f"logging.run_name=precision-ab-{setting}",
    ]


def read_curve(metrics: Path) -> dict[int, dict]:
    """step -> that step's metrics (the last line written for a step wins)."""
    curve = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        curve[int(record["step"])] = record
    return curve


def mean_logged_speed(curve: dict[int, dict]) -> float:
    """Mean tokens/s over the steps that logged one (nan if none did)."""
    logged = [r["tokens_per_s"] for r in curve.values() if "tokens_per_s" in r]
    return statistics.fmean(logged) if logged else float("nan")


def table(settings: list[str], curves: list[dict[int, dict]], every: int, tail: int) -> str:
    header = "| step | " + " | ".join(f"loss, fp8 {s}" for s in settings) + " |"
    lines = [header, "|---|" + "---|" * len(settings)]
    last = min(max(c) for c in curves)
    for step in list(range(every, last + 1, every)) or [last]:
        losses = [f"{c[step]['loss']:.4f}" if step in c else "-" for c in curves]
        lines.append(f"| {step} | " + " | ".join(losses) + " |")
    tails = [
        statistics.fmean(c[s]["loss"] for s in range(last - tail + 1, last + 1)) for c in curves
    ]
    speeds = [mean_logged_speed(c) for c in curves]
    lines.append(f"| mean of the last {tail} | " + " | ".join(f"{t:.4f}" for t in tails) + " |")
    lines.append(
        "| vs the first | " + " | ".join(f"{100 * (t / tails[0] - 1):+.2f}%" for t in tails) + " |"
    )
    lines.append("| tokens/s (mean of logged) | " + " | ".join(f"{v:,.0f}" for v in speeds) + " |")
    return "\n".join(lines)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--settings", default="none,rowwise", help="comma-separated training.fp8 values")
    p.add_argument("--every", type=int, default=50, help="table row every this many steps")
    p.add_argument("--tail", type=int, default=20, help="final loss = mean of this many last steps")
    args = p.parse_args()
    settings = args.settings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        # Each run's per-step metrics are kept beside the table (--out), or dropped with tmp.
        runs = [(s, Path(args.out or tmp) / f"precision_ab_{s}.jsonl") for s in settings]
        if args.dry_run:
            for setting, metrics in runs:
                print(" ".join(train_command(args.config, args.overrides, setting, metrics)))
            return 0
        curves = []
        for setting, metrics in runs:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.unlink(missing_ok=True)
            done = subprocess.run(train_command(args.config, args.overrides, setting, metrics))
            if done.returncode:
                print(f"training.fp8={setting} failed ({done.returncode})", file=sys.stderr)
                return done.returncode
            curves.append(read_curve(metrics))
    text = f"{device_line()}\nconfig {args.config} {' '.join(args.overrides)}\n" + table(
        settings, curves, args.every, args.tail
    )
    publish_table(args.out, "precision_ab.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
