"""Requests/s of the lm-eval adapter's scoring on the paper's zero-shot suite, and the wall time
of the whole suite estimated from it.

The suite's datasets come from the HF hub, which the GPU machines cannot reach, so each task is
stood in for by synthetic requests of its shape: its number of choices per document and the
approximate mean token lengths of its contexts and continuations (GPT-NeoX tokenizer; lengths
drawn uniformly within +-50% of the mean). ``--limit`` documents per task are scored through
``evaluation.scoring.score_continuations`` (the adapter's batched full forwards) on the given
config's model (random weights); the full suite's time is each task's full request count over
its measured rate.

    python bench/eval_throughput.py --config configs/blackmamba-340m-1.5b.yaml --limit 200
    python bench/eval_throughput.py --dry-run
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import bench_parser, device_line, publish_table  # noqa: E402

# task -> (documents in the split lm-eval scores, requests per document, mean context tokens,
# mean continuation tokens); lengths are estimates for the GPT-NeoX tokenizer.
PAPER_TASKS = {
    "hellaswag": (10042, 4, 80, 25),
    "piqa": (1838, 2, 15, 25),
    "winogrande": (1267, 2, 20, 10),
    "lambada_openai": (5153, 1, 80, 2),
    "arc_easy": (2376, 4, 30, 5),
    "arc_challenge": (1172, 4, 35, 8),
    "openbookqa": (500, 4, 20, 6),
}


def synthetic_requests(
    task: str, documents: int, vocab: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    _, choices, context, continuation = PAPER_TASKS[task]
    rng = random.Random(f"{task}-{seed}")

    def draw(mean: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, round(mean * rng.uniform(0.5, 1.5))))]

    pairs = []
    for _ in range(documents):
        ctx = draw(context)
        pairs += [(ctx, draw(continuation)) for _ in range(choices)]
    return pairs


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--limit", type=int, default=200, help="documents per task (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="sequences per forward (default %(default)s)"
    )
    args = parser.parse_args()
    print(f"tasks {list(PAPER_TASKS)}; {args.limit} documents each; batch {args.batch_size}")
    if args.dry_run:
        return 0
    import torch

    from megatron_blackmamba.config import load_config
    from megatron_blackmamba.evaluation.scoring import score_continuations
    from megatron_blackmamba.model.builder import build_model
    from megatron_blackmamba.parallel.setup import destroy, init_distributed

    job = load_config(args.config, args.overrides)
    init_distributed(job.parallel, job.training.seed)
    model = build_model(job).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    vocab = 50277
    rows, total_s = [], 0.0
    warm = synthetic_requests("piqa", 8, vocab, seed=1)
    score_continuations(model, warm, args.batch_size, job.training.seq_length, vocab)
    for task, (docs, choices, _, _) in PAPER_TASKS.items():
        pairs = synthetic_requests(task, args.limit, vocab)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        score_continuations(model, pairs, args.batch_size, job.training.seq_length, vocab)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rate = len(pairs) / seconds
        full = docs * choices / rate
        total_s += full
        rows.append(
            f"| {task} | {len(pairs)} | {seconds:.2f} | {rate:,.0f} | {docs * choices:,} |"
            f" {full:.0f} |"
        )
    destroy()
    table = "\n".join(
        [
            device_line(),
            f"config {args.config} {' '.join(args.overrides)}; batch {args.batch_size}",
            "| task | requests timed | s | requests/s | full-suite requests | est. full s |",
            "|---|---|---|---|---|---|",
            *rows,
            f"| **paper suite** | | | | | **{total_s:.0f} s ({total_s / 60:.1f} min)** |",
        ]
    )
    publish_table(args.out, "eval_throughput.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
