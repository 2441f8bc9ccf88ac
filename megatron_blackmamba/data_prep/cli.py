"""blackmamba-prep <subcommand>: corpora -> Megatron indexed datasets and blend files.

  build    one corpus -> PREFIX.bin/.idx (resumable: rerun the same command after a crash);
           with --num-tasks N one task of N (a SLURM array element), then --finalize
  status   progress of a build at PREFIX: tasks, shards, tokens, tokens/s, ETA, bad records
  merge    concatenate indexed datasets, or a build's shards, into one prefix
  mixture  build every source of a mixture YAML, write blend.txt/blend.json and a summary
  readers  list the corpus readers
  sample   build the bundled sample corpus into a cache folder and print its prefix

Exit status: 0 done, 1 unusable arguments/inputs, 2 a bad record under --strict.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import List, NoReturn, Optional, Tuple

from .build import DEFAULT_SHARD_BYTES, BuildSpec, build
from .issues import BadRecordError, InputError
from .merge import merge_indexed_datasets
from .mixture import build_arguments, load_mixture, run_mixture
from .readers import READERS
from .sample import ensure_sample_dataset
from .shards import Manifest
from .status import status_report
from .tasks import task_from_env
from .tokenizer import EOD_TOKEN


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.run(args)
    except BadRecordError as error:
        print(f"data_prep: error: {error}", file=sys.stderr)
        return 2
    except InputError as error:
        print(f"data_prep: error: {error}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace) -> None:
    result = build(build_spec(args))
    print(result.report())


def build_spec(args: argparse.Namespace) -> BuildSpec:
    """The ``build`` subcommand's arguments as a BuildSpec (Megatron's aliases resolved)."""
    options: Tuple[Tuple[str, str], ...] = ()
    text_key = _text_key(args)
    if args.reader == "jsonl":
        options = (("text_key", text_key),)
    elif text_key != "text":
        raise InputError(
            f"--text-key/--json-keys apply to the jsonl reader; the {args.reader} reader "
            "knows where its format keeps the text"
        )
    if args.reader == "pg19":
        options = (("split", args.split or "train"),)
    elif args.split is not None and args.split != "train":
        raise InputError(f"--split applies to the pg19 reader, not {args.reader}")
    if args.output_prefix is not None:
        output = f"{args.output_prefix}_{text_key}_document"  # Megatron's preprocess_data.py naming
    elif args.output is not None:
        output = args.output
    else:
        raise InputError("give --output PREFIX (or Megatron's --output-prefix)")
    return BuildSpec(
        reader=args.reader,
        inputs=tuple(p for group in args.input for p in group),
        tokenizer=args.tokenizer,
        output=output,
        eod_token=args.eod_token,
        workers=args.workers,
        shard_bytes=_shard_bytes(args),
        include_subsets=tuple(args.include_subset),
        exclude_subsets=tuple(args.exclude_subset),
        strict=args.strict,
        keep_shards=args.keep_shards,
        restart=args.restart,
        progress=not args.no_progress,
        reader_options=options,
        task=task_from_env(args.num_tasks, args.task_index),
        finalize=args.finalize,
    )


def _text_key(args: argparse.Namespace) -> str:
    if args.json_keys:
        if len(args.json_keys) > 1:
            raise InputError(
                f"--json-keys {' '.join(args.json_keys)}: one dataset per build; run once per key"
            )
        return args.json_keys[0]
    return args.text_key


def _status(args: argparse.Namespace) -> None:
    print(status_report(args.prefix))


def _merge(args: argparse.Namespace) -> None:
    prefixes = list(args.prefixes)
    for manifest_path in args.manifest:
        prefixes.extend(Manifest.load(manifest_path).complete_shard_prefixes())
    info = merge_indexed_datasets(prefixes, args.output)
    print(
        f"{args.output}.bin/.idx: {info.documents:,} documents, {info.tokens:,} tokens "
        f"from {len(prefixes)} inputs"
    )


def _mixture(args: argparse.Namespace) -> None:
    if args.print_builds:
        for name, build_args in build_arguments(
            load_mixture(args.config),
            args.output_dir,
            args.tokenizer,
            args.eod_token,
            _shard_bytes(args),
        ):
            print(f"{name}\t{shlex.join(build_args)}")
        return
    result = run_mixture(
        load_mixture(args.config),
        args.output_dir,
        tokenizer=args.tokenizer,
        eod_token=args.eod_token,
        workers=args.workers,
        shard_bytes=_shard_bytes(args),
        strict=args.strict,
        progress=not args.no_progress,
        build_sources=not args.summary_only,
        token_budget=args.token_budget,
    )
    for built in result.builds:
        print(built.report() + "\n")
    print(result.summary)
    print(f"blend: {result.blend_files[0]}  {result.blend_files[1]}")


def _readers(args: argparse.Namespace) -> None:
    for name, cls in READERS.items():
        print(f"{name:12s} {cls.description}")


def _sample(args: argparse.Namespace) -> None:
    print(ensure_sample_dataset(args.cache_dir))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shard_bytes(args: argparse.Namespace) -> int:
    if args.shard_size_mb <= 0:
        raise InputError("--shard-size-mb must be > 0")
    return max(1, int(args.shard_size_mb * (1 << 20)))


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; here 2 means a bad record under --strict."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blackmamba-prep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def tokenising(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--eod-token",
            default=EOD_TOKEN,
            help=(
                "end-of-document token appended to every document (default "
                "%(default)s); its id comes from the tokenizer"
            ),
        )
        sub.add_argument(
            "--workers",
            type=_positive_int,
            default=1,
            help="tokenising processes (1 = in this process)",
        )
        sub.add_argument(
            "--shard-size-mb",
            type=float,
            default=DEFAULT_SHARD_BYTES / (1 << 20),
            help=(
                "uncompressed input per shard, the unit of parallelism and of "
                "resuming (default %(default)g)"
            ),
        )
        sub.add_argument(
            "--strict",
            action="store_true",
            help=(
                "stop with exit status 2 at the first bad record instead of "
                "skipping and counting it"
            ),
        )
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub = commands.add_parser("build", help="one corpus -> one indexed dataset")
    sub.add_argument(
        "--reader",
        default="jsonl",
        choices=sorted(READERS),
        help="corpus format (default %(default)s: any JSON-lines file)",
    )
    sub.add_argument(
        "--input",
        required=True,
        nargs="+",
        action="append",
        help="input files, folders or glob patterns (quote globs)",
    )
    sub.add_argument("--tokenizer", required=True, help="path to a tokenizer.json")
    outputs = sub.add_mutually_exclusive_group()
    outputs.add_argument(
        "--output", help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.shards/"
    )
    outputs.add_argument(
        "--output-prefix", help="Megatron's naming: the output is OUTPUT_PREFIX_<text key>_document"
    )
    sub.add_argument(
        "--text-key", default="text", help="jsonl reader: the field holding the text (default text)"
    )
    sub.add_argument(
        "--json-keys", nargs="+", metavar="KEY", help="Megatron's alias of --text-key (one key)"
    )
    sub.add_argument(
        "--split",
        default=None,
        help=(
            "pg19 reader, given the root folder: the split to read "
            "(train, validation or test; default train)"
        ),
    )
    sub.add_argument(
        "--num-tasks",
        type=_positive_int,
        default=None,
        help="split the build into this many tasks (default $SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    sub.add_argument(
        "--task-index",
        type=int,
        default=None,
        help=(
            "the task this process builds, 0-based (default $SLURM_ARRAY_TASK_ID - "
            "$SLURM_ARRAY_TASK_MIN, else 0)"
        ),
    )
    sub.add_argument(
        "--finalize",
        action="store_true",
        help="merge every task's shards into PREFIX.bin/.idx (refused until all are complete)",
    )
    sub.add_argument(
        "--include-subset",
        action="append",
        default=[],
        metavar="NAME",
        help="keep only these subsets (e.g. Pile 'ArXiv'); repeatable",
    )
    sub.add_argument(
        "--exclude-subset",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "drop these subsets (e.g. Pile 'Books3'; '(none)' = records without "
            "a subset name); repeatable"
        ),
    )
    sub.add_argument(
        "--keep-shards", action="store_true", help="keep the per-shard files after merging"
    )
    sub.add_argument(
        "--restart",
        action="store_true",
        help="discard an earlier build at this prefix instead of resuming it",
    )
    tokenising(sub)
    sub.set_defaults(run=_build)

    sub = commands.add_parser(
        "status", help="progress of a build: tasks, shards, tokens, tokens/s, ETA"
    )
    sub.add_argument("prefix", help="the build's output prefix (its --output)")
    sub.set_defaults(run=_status)

    sub = commands.add_parser("merge", help="concatenate indexed datasets into one prefix")
    sub.add_argument("--output", required=True, help="output prefix")
    sub.add_argument(
        "--manifest",
        action="append",
        default=[],
        help=(
            "merge the shards of a build kept with --keep-shards "
            "(PREFIX.shards/manifest.json); repeatable, in order"
        ),
    )
    sub.add_argument("prefixes", nargs="*", help="input prefixes, in order")
    sub.set_defaults(run=_merge)

    sub = commands.add_parser("mixture", help="build a mixture YAML's sources and its blend")
    sub.add_argument("config", help="mixture YAML (see configs/data/)")
    sub.add_argument(
        "--output-dir",
        required=True,
        help="writes SOURCE/SOURCE_text_document.*, blend.txt, blend.json, summary.txt",
    )
    sub.add_argument("--tokenizer", help="tokenizer.json (overrides the config's)")
    sub.add_argument(
        "--token-budget",
        type=float,
        help="training tokens for the epochs column (default: config or 300e9)",
    )
    sub.add_argument(
        "--summary-only",
        action="store_true",
        help="do not build; summarise sources built earlier and write the blend",
    )
    sub.add_argument(
        "--print-builds",
        action="store_true",
        help="print each source's name and `build` arguments (tab-separated), build nothing",
    )
    tokenising(sub)
    sub.set_defaults(run=_mixture)

    sub = commands.add_parser("readers", help="list corpus readers")
    sub.set_defaults(run=_readers)

    sub = commands.add_parser("sample", help="build the bundled sample corpus, print its prefix")
    sub.add_argument("--cache-dir", default="data/cache")
    sub.set_defaults(run=_sample)
    return parser
