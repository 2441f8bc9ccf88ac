"""blackmamba-prep <subcommand>: corpora -> Megatron indexed datasets and blend files.

  build    one corpus -> PREFIX.bin/.idx (resumable: rerun the same command after a crash)
  merge    concatenate indexed datasets, or a build's shards, into one prefix
  mixture  build every source of a mixture YAML, write blend.txt/blend.json and a summary
  readers  list the corpus readers
  sample   build the bundled sample corpus into a cache folder and print its prefix

Exit status: 0 done, 1 unusable arguments/inputs, 2 a bad record under --strict.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, NoReturn, Optional

from .build import DEFAULT_SHARD_BYTES, BuildSpec, build
from .issues import BadRecordError, InputError
from .merge import merge_indexed_datasets
from .mixture import load_mixture, run_mixture
from .readers import READERS
from .sample import ensure_sample_dataset
from .shards import Manifest
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
    result = build(BuildSpec(
        reader=args.reader, inputs=tuple(p for group in args.input for p in group),
        tokenizer=args.tokenizer, output=args.output, eod_token=args.eod_token,
        workers=args.workers, shard_bytes=_shard_bytes(args),
        include_subsets=tuple(args.include_subset), exclude_subsets=tuple(args.exclude_subset),
        strict=args.strict, keep_shards=args.keep_shards, restart=args.restart,
        progress=not args.no_progress))
    print(result.report())


def _merge(args: argparse.Namespace) -> None:
    prefixes = list(args.prefixes)
    for manifest_path in args.manifest:
        prefixes.extend(Manifest.load(manifest_path).complete_shard_prefixes())
    info = merge_indexed_datasets(prefixes, args.output)
    print(f"{args.output}.bin/.idx: {info.documents:,} documents, {info.tokens:,} tokens "
          f"from {len(prefixes)} inputs")


def _mixture(args: argparse.Namespace) -> None:
    result = run_mixture(
        load_mixture(args.config), args.output_dir, tokenizer=args.tokenizer,
        eod_token=args.eod_token, workers=args.workers, shard_bytes=_shard_bytes(args),
        strict=args.strict, progress=not args.no_progress, build_sources=not args.summary_only,
        token_budget=args.token_budget)
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
    parser = _Parser(prog="blackmamba-prep", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def tokenising(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--eod-token", default=EOD_TOKEN,
                         help="end-of-document token appended to every document (default "
                              "%(default)s); its id comes from the tokenizer")
        sub.add_argument("--workers", type=_positive_int, default=1,
                         help="tokenising processes (1 = in this process)")
        sub.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_BYTES / (1 << 20),
                         help="uncompressed input per shard, the unit of parallelism and of "
                              "resuming (default %(default)g)")
        sub.add_argument("--strict", action="store_true",
                         help="stop with exit status 2 at the first bad record instead of "
                              "skipping and counting it")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub = commands.add_parser("build", help="one corpus -> one indexed dataset")
    sub.add_argument("--reader", required=True, choices=sorted(READERS))
    sub.add_argument("--input", required=True, nargs="+", action="append",
                     help="input files, folders or glob patterns (quote globs)")
    sub.add_argument("--tokenizer", required=True, help="path to a tokenizer.json")
    sub.add_argument("--output", required=True,
                     help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.shards/")
    sub.add_argument("--include-subset", action="append", default=[], metavar="NAME",
                     help="keep only these subsets (e.g. Pile 'ArXiv'); repeatable")
    sub.add_argument("--exclude-subset", action="append", default=[], metavar="NAME",
                     help="drop these subsets (e.g. Pile 'Books3'; '(none)' = records without "
                          "a subset name); repeatable")
    sub.add_argument("--keep-shards", action="store_true",
                     help="keep the per-shard files after merging")
    sub.add_argument("--restart", action="store_true",
                     help="discard an earlier build at this prefix instead of resuming it")
    tokenising(sub)
    sub.set_defaults(run=_build)

    sub = commands.add_parser("merge", help="concatenate indexed datasets into one prefix")
    sub.add_argument("--output", required=True, help="output prefix")
    sub.add_argument("--manifest", action="append", default=[],
                     help="merge the shards of a build kept with --keep-shards "
                          "(PREFIX.shards/manifest.json); repeatable, in order")
    sub.add_argument("prefixes", nargs="*", help="input prefixes, in order")
    sub.set_defaults(run=_merge)

    sub = commands.add_parser("mixture", help="build a mixture YAML's sources and its blend")
    sub.add_argument("config", help="mixture YAML (see configs/data/)")
    sub.add_argument("--output-dir", required=True,
                     help="writes SOURCE/SOURCE_text_document.*, blend.txt, blend.json, "
                          "summary.txt")
    sub.add_argument("--tokenizer", help="tokenizer.json (overrides the config's)")
    sub.add_argument("--token-budget", type=float,
                     help="training tokens for the epochs column (default: config or 300e9)")
    sub.add_argument("--summary-only", action="store_true",
                     help="do not build; summarise sources built earlier")
    tokenising(sub)
    sub.set_defaults(run=_mixture)

    sub = commands.add_parser("readers", help="list corpus readers")
    sub.set_defaults(run=_readers)

    sub = commands.add_parser("sample", help="build the bundled sample corpus, print its prefix")
    sub.add_argument("--cache-dir", default="data/cache")
    sub.set_defaults(run=_sample)
    return parser
