"""Pretrain BlackMamba: ``blackmamba-train --config CONFIG [section.field=value ...]``.

Without arguments it trains the tiny model on the bundled sample corpus (the bundled
``tiny.yaml``), the project's main job on a CPU. The same entry point runs under torchrun or srun
at any TP/PP/EP/DP layout and resumes from the newest intact checkpoint (training.loop).

The config is read and checked first, before torch.distributed or any model exists: a bad value,
an unknown key or an impossible layout for the launch's world size ends the job in seconds with
every problem listed. ``--preflight`` goes further without a GPU: the data, the tokenizer, the
checkpoint folder and the model's size (training.preflight).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_blackmamba.config import ConfigError, describe, load_config, to_yaml
from megatron_blackmamba.logging_setup import configure_logging
from megatron_blackmamba.parallel.env import launch_env
from megatron_blackmamba.resources import list_configs

DEFAULT_CONFIG = "tiny"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=(
            "YAML config: a path, or the name of a bundled one (default: tiny; --list-configs); "
            "an empty value starts from the built-in defaults"
        ),
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config field with its type, default and help",
    )
    parser.add_argument(
        "--list-configs", action="store_true", help="print the bundled configs' names"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument(
        "--preflight",
        action="store_true",
        help=(
            "check config, data, tokenizer, checkpoint folder and model size without training; "
            "exit 1 listing every problem"
        ),
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="world size to check the layout against (default: from torchrun/SLURM variables)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="section.field=value overrides, e.g. parallel.tp=2"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    if args.list_configs:
        print("\n".join(list_configs()))
        return 0
    world_size = args.world_size or launch_env().world_size
    try:
        job = load_config(args.config or None, args.overrides, world_size=world_size)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(job), end="")
        return 0
    configure_logging(job.logging.verbose, job.logging.all_ranks)
    if args.preflight:
        from megatron_blackmamba.training.preflight import preflight

        return preflight(job, world_size)

    from megatron_blackmamba.parallel.setup import destroy
    from megatron_blackmamba.training.loop import train

    try:
        final = train(job)
    except ConfigError as exc:  # what only the machine it runs on can refuse (training.fp8)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy()
    if final["steps"] == 0:  # resumed at the last step
        print(
            f"done: already at step {final['iteration']} (nothing to train; raise"
            " training.train_iters or use a new checkpoint.save folder)",
            file=sys.stderr,
        )
    else:
        print(f"done: step {final['iteration']}, loss {final['loss']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
