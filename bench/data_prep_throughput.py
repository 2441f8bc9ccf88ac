"""Throughput of ``data_prep build`` against a baseline in the style of Megatron-LM's
``tools/preprocess_data.py``, on the same input and tokenizer, with 1 and 2 workers.

The input is a >= ``--size-mb`` (uncompressed) Pile-format jsonl.zst of synthetic but realistic
text: documents recombined at random from the paragraphs of the bundled sample corpus (Python
docs, docstrings and code), so word statistics are those of real text. It is generated once and
cached (``--cache-dir``).

The baseline mirrors preprocess_data.py: the main process reads lines, a ``multiprocessing.Pool``
maps them (``imap``, chunks of 32) to workers that ``json.loads`` and encode one document at a
time, and the main process appends each document with ``IndexedDatasetBuilder.add_document``.
Both tools use one tokenizer thread per worker (TOKENIZERS_PARALLELISM=false) and must produce
byte-identical outputs, which is checked.

    python bench/data_prep_throughput.py                 # 200 MB, workers 1 and 2
    python bench/data_prep_throughput.py --size-mb 20    # quick
    python bench/data_prep_throughput.py --dry-run       # print the plan, exit
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from megatron_blackmamba.data_prep.build import BuildSpec, build  # noqa: E402
from megatron_blackmamba.data_prep.fileio import AtomicFile  # noqa: E402
from megatron_blackmamba.data_prep.readers.jsonl import decompressed_chunks  # noqa: E402
from megatron_blackmamba.data_prep.sample import SAMPLE_DIR, sample_tokenizer_path  # noqa: E402
from megatron_blackmamba.data_prep.stats import format_table  # noqa: E402
from megatron_blackmamba.data_prep.tokenizer import EOD_TOKEN, optimal_dtype  # noqa: E402


# ----------------------------------------------------------------------- input corpus

def _sample_paragraphs() -> Dict[str, List[str]]:
    paragraphs: Dict[str, List[str]] = {}
    for path in sorted(SAMPLE_DIR.glob("*.jsonl.zst")):
        for line in b"".join(decompressed_chunks(str(path))).splitlines():
            record = json.loads(line)
            pool = paragraphs.setdefault(record["meta"]["pile_set_name"], [])
            pool.extend(p for p in record["text"].split("\n\n") if p.strip())
    return paragraphs


def synthetic_corpus(cache_dir: Path, size_mb: float, seed: int = 0) -> Path:
    """A cached Pile-format jsonl.zst of >= size_mb uncompressed bytes."""
    import zstandard

    path = cache_dir / f"synthetic-{size_mb:g}mb-seed{seed}.jsonl.zst"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    pools = _sample_paragraphs()
    subsets = sorted(pools)
    rng = random.Random(seed)
    target, written = int(size_mb * (1 << 20)), 0
    with AtomicFile(str(path)) as out:
        with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as writer:
            while written < target:
                subset = rng.choice(subsets)
                count = max(1, int(rng.lognormvariate(1.5, 1.0)))
                text = "\n\n".join(rng.choice(pools[subset]) for _ in range(count))
                line = json.dumps({"text": text, "meta": {"pile_set_name": subset}}) + "\n"
                data = line.encode("utf-8")
                writer.write(data)
                written += len(data)
    return path


# ----------------------------------------------------------------------- baseline

_encoder: Optional[Tuple[object, int]] = None


def _init_baseline_worker(tokenizer_path: str) -> None:
    global _encoder
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    _encoder = (tokenizer, tokenizer.token_to_id(EOD_TOKEN))


def _encode_line(line: str) -> Tuple[List[int], int]:
    tokenizer, eod = _encoder  # type: ignore[misc]
    text = json.loads(line)["text"]
    ids = tokenizer.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
    ids.append(eod)
    return ids, len(line)


def baseline(input_path: Path, tokenizer_path: str, prefix: str, workers: int) -> Tuple[int, int]:
    """preprocess_data.py's approach; returns (documents, tokens)."""
    import warnings

    import zstandard
    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = optimal_dtype(Tokenizer.from_file(tokenizer_path).get_vocab_size(True))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    documents = tokens = 0
    with open(input_path, "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), "utf-8")
        with multiprocessing.Pool(workers, _init_baseline_worker, (tokenizer_path,)) as pool:
            for ids, _ in pool.imap(_encode_line, lines, 32):
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return documents, tokens


# ----------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0,
                        help="uncompressed size of the synthetic input (default %(default)g)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--tokenizer", default=sample_tokenizer_path(),
                        help="tokenizer.json (default: the bundled sample tokenizer)")
    parser.add_argument("--shard-size-mb", type=float, default=16.0,
                        help="data_prep shard size (default %(default)g)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                            "data_prep_bench"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    cache = Path(args.cache_dir)
    print(f"input: {args.size_mb:g} MB synthetic jsonl.zst in {cache}; tokenizer {args.tokenizer}; "
          f"workers {workers}; data_prep shards of {args.shard_size_mb:g} MB")
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
    if not os.path.isfile(args.tokenizer):
        print(f"error: tokenizer not found: {args.tokenizer}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0

    start = time.perf_counter()
    corpus = synthetic_corpus(cache, args.size_mb)
    input_bytes = sum(len(c) for c in decompressed_chunks(str(corpus)))  # also warms the cache
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.1f} MB compressed, "
          f"{input_bytes / 1e6:.1f} MB text) ready in {time.perf_counter() - start:.1f} s")

    rows = []
    with tempfile.TemporaryDirectory(dir=cache) as out:
        for count in workers:
            base_prefix = os.path.join(out, f"baseline-{count}")
            start = time.perf_counter()
            docs, tokens = baseline(corpus, args.tokenizer, base_prefix, count)
            base_s = time.perf_counter() - start

            ours_prefix = os.path.join(out, f"data_prep-{count}")
            start = time.perf_counter()
            result = build(BuildSpec(reader="pile", inputs=(str(corpus),),
                                     tokenizer=args.tokenizer, output=ours_prefix,
                                     workers=count, progress=False,
                                     shard_bytes=int(args.shard_size_mb * (1 << 20))))
            ours_s = time.perf_counter() - start
            identical = all(filecmp.cmp(base_prefix + ext, ours_prefix + ext, shallow=False)
                            for ext in (".bin", ".idx"))
            assert result.output.documents == docs and result.output.tokens == tokens
            for tool, seconds in (("megatron-style baseline", base_s), ("data_prep", ours_s)):
                rows.append((tool, count, f"{seconds:.1f}", f"{docs / seconds:,.0f}",
                             f"{tokens / seconds:,.0f}", f"{input_bytes / seconds / 1e6:.2f}",
                             f"{base_s / seconds:.2f}x", "yes" if identical else "NO"))
    print(f"{docs:,} documents, {tokens:,} tokens")
    print(format_table(("tool", "workers", "wall s", "docs/s", "tokens/s", "MB/s",
                        "speed vs baseline", "same bytes"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
