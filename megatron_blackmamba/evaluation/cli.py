"""``blackmamba-eval``: lm-evaluation-harness tasks, or held-out perplexity, for a checkpoint.

    blackmamba-eval --ckpt DIR --tasks hellaswag,piqa [--limit N] [--batch-size B] [--num-fewshot K]
    \
        [--output results.json] [--include-path TASK_DIR]
    blackmamba-eval --ckpt DIR --tasks paper            # the paper's zero-shot suite
    (tasks/paper.yaml)
    blackmamba-eval --ckpt DIR --heldout [--data-path PREFIX | --blend FILE] [--max-samples N]

Tasks run through ``lm_eval.simple_evaluate`` with the ``blackmamba`` model; the table is lm-eval's.
Nothing is downloaded: tasks whose data comes from the HF hub read it from the local HF cache
(``HF_DATASETS_OFFLINE=1`` is set), and a task whose data is missing is named with the fix.
``--heldout`` computes the mean token loss and perplexity over the validation split of the
checkpoint's training blend (or of ``--data-path`` / ``--blend``), with a progress bar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

TASK_DIR = Path(__file__).resolve().parent / "tasks"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blackmamba-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (or one iter_* inside it)")
    parser.add_argument("--config", help="YAML config of the model (default: the checkpoint's)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument(
        "--tasks", help="comma-separated lm-eval tasks or groups ('paper': the paper's suite)"
    )
    parser.add_argument(
        "--heldout", action="store_true", help="held-out loss and perplexity instead of tasks"
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--data-path", help="with --heldout: a data_prep prefix (its validation split)"
    )
    data.add_argument("--blend", help="with --heldout: a blend file (its validation split)")
    parser.add_argument(
        "--max-samples", type=int, default=0, help="with --heldout: at most this many sequences"
    )
    parser.add_argument(
        "--limit", type=float, default=None, help="examples per task (a fraction if < 1)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)"
    )
    parser.add_argument(
        "--include-path", action="append", default=[], help="extra lm-eval task YAML folder"
    )
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float64 | bfloat16")
    parser.add_argument("--output", help="write the results JSON here")
    return parser.parse_args(argv)


def run_tasks(args: argparse.Namespace) -> dict:
    """lm-eval's simple_evaluate with the blackmamba model; raises a clear error for missing
    data."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron_blackmamba.evaluation.lm_eval_adapter  # noqa: F401  (registers the model)

    manager = TaskManager(include_path=[str(TASK_DIR), *args.include_path])
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(
            f"blackmamba-eval: unknown task(s) {', '.join(unknown)}; --include-path adds task"
            " folders"
        )
    model_args = {"ckpt": args.ckpt, "batch_size": args.batch_size, "dtype": args.dtype}
    model_args.update(
        {k: v for k, v in (("config", args.config), ("tokenizer", args.tokenizer)) if v}
    )
    try:
        return lm_eval.simple_evaluate(
            model="blackmamba",
            model_args=model_args,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
        )
    except (ConnectionError, OSError, ValueError) as error:
        if (
            "offline" in str(error).lower()
            or "connect" in str(error).lower()
            or "cache" in str(error).lower()
        ):
            raise SystemExit(
                f"blackmamba-eval: a task's dataset is not in the local HF cache ({error}). On a"
                " machine with access run once: HF_DATASETS_OFFLINE=0 lm_eval --model dummy"
                f" --tasks {args.tasks} --limit 1, then copy ~/.cache/huggingface (or $HF_HOME)"
                " here"
            ) from None
        raise


def heldout(args: argparse.Namespace) -> dict:
    """Mean token loss and perplexity over a validation split (see evaluation.heldout)."""
    from megatron_blackmamba.evaluation.heldout import heldout_loss
    from megatron_blackmamba.generation.cli import load_model_and_job

    overrides = []
    blend_file = None
    if args.data_path:
        blend_file = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        blend_file.write(f"1.0 {os.path.abspath(args.data_path)}\n")
        blend_file.close()
        overrides.append(f"data.blend={blend_file.name}")
    elif args.blend:
        overrides.append(f"data.blend={args.blend}")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    model, job = load_model_and_job(args.ckpt, args.config, overrides)
    try:
        return heldout_loss(job, model, args.max_samples, args.batch_size)
    finally:
        if blend_file is not None:
            os.remove(blend_file.name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if bool(args.tasks) == args.heldout:
        print("blackmamba-eval: give either --tasks or --heldout", file=sys.stderr)
        return 2
    from megatron_blackmamba.logging_setup import configure_logging
    from megatron_blackmamba.parallel.setup import destroy

    configure_logging()
    start = time.perf_counter()
    try:
        results = heldout(args) if args.heldout else run_tasks(args)
        import torch.distributed as dist

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
    finally:
        destroy()
    if not rank0:
        return 0
    if args.heldout:
        print(
            f"held-out: {results['tokens']:,} tokens, loss {results['loss']:.6f}, perplexity "
            f"{results['perplexity']:.4f} ({results['tokens_per_s']:,.0f} tokens/s)"
        )
    else:
        from lm_eval.utils import make_table

        print(make_table(results))
        if "groups" in results and results["groups"]:
            print(make_table(results, "groups"))
        results = {
            k: results[k]
            for k in ("results", "groups", "configs", "versions", "n-shot")
            if k in results
        }
    results["wall_s"] = time.perf_counter() - start
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
