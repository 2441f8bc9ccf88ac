"""Throughput of ``blackmamba-prep build`` against Megatron-LM's own ``tools/preprocess_data.py``
(from a local checkout, ``--megatron-lm PATH``) and a baseline in its style, on the same input
and tokenizer, side by side at each worker count.

The input is a >= ``--size-mb`` (uncompressed) Pile-format jsonl.zst of synthetic but realistic
text: documents recombined at random from the paragraphs of the bundled sample corpus (Python
docs, docstrings and code), so word statistics are those of real text. It is generated once and
cached (``--cache-dir``).

The baseline mirrors preprocess_data.py: the main process reads lines, a ``multiprocessing.Pool``
maps them (``imap``, chunks of 32) to workers that ``json.loads`` and encode one document at a
time, and the main process appends each document with ``IndexedDatasetBuilder.add_document``.
Both tools use one tokenizer thread per worker (TOKENIZERS_PARALLELISM=false) and must produce
byte-identical outputs, which is checked. Megatron-LM's script reads plain jsonl (a decompressed
copy of the corpus, which every tool then reads) and loads the tokenizer through transformers'
AutoTokenizer (``--tokenizer-type HuggingFaceTokenizer``); its token ids are compared with ours
document by document, and the first difference is shown. Without ``--megatron-lm`` (or when its
imports fail, e.g. without triton) that column is skipped with the reason.

    python bench/data_prep_throughput.py --megatron-lm ~/src/Megatron-LM --workers 1,2,4,8
    python bench/data_prep_throughput.py                 # 200 MB, workers 1 and 2
    python bench/data_prep_throughput.py --size-mb 20    # quick
    python bench/data_prep_throughput.py --dry-run       # print the plan, exit
"""

from __future__ import annotations

import argparse
import filecmp
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

import numpy as np

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

    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = optimal_dtype(Tokenizer.from_file(tokenizer_path).get_vocab_size(True))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    documents = tokens = 0
    with open(input_path, encoding="utf-8") as lines:
        with multiprocessing.Pool(workers, _init_baseline_worker, (tokenizer_path,)) as pool:
            for ids, _ in pool.imap(_encode_line, lines, 32):
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return documents, tokens


# ----------------------------------------------------------------------- Megatron-LM itself


def plain_copy(corpus: Path) -> Path:
    """The corpus decompressed to .jsonl (what preprocess_data.py reads), cached beside it."""
    path = corpus.with_suffix("")  # x.jsonl.zst -> x.jsonl
    if not path.exists():
        with AtomicFile(str(path)) as out:
            for chunk in decompressed_chunks(str(corpus)):
                out.write(chunk)
    return path


def megatron_lm(
    checkout: Path, input_path: Path, tokenizer_path: str, prefix: str, workers: int
) -> str:
    """Run the checkout's tools/preprocess_data.py; returns its output prefix. Raises
    RuntimeError with the tail of its output if it fails."""
    import subprocess

    model_dir = Path(prefix + "-tokenizer")
    model_dir.mkdir(exist_ok=True)
    (model_dir / "tokenizer.json").write_bytes(Path(tokenizer_path).read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD_TOKEN}))
    command = [
        sys.executable,
        str(checkout / "tools" / "preprocess_data.py"),
        "--input",
        str(input_path),
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(model_dir),
        "--workers",
        str(workers),
        "--append-eod",
        "--log-interval",
        "100000000",
    ]
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError((result.stdout + result.stderr).strip().splitlines()[-1])
    return prefix + "_text_document"


def compare_ids(ours: str, theirs: str) -> str:
    """'same' or where the two datasets' token ids first differ."""
    from megatron_blackmamba.data_prep.writer import read_sequences

    (a, ao), (b, bo) = read_sequences(ours), read_sequences(theirs)
    if len(ao) != len(bo):
        return f"{len(ao) - 1} vs {len(bo) - 1} documents"
    for i in range(len(ao) - 1):
        x, y = a[ao[i] : ao[i + 1]], b[bo[i] : bo[i + 1]]
        if len(x) != len(y) or not np.array_equal(x, y):
            return (
                f"document {i} differs: {x[:8].tolist()}... ({len(x)}) vs {y[:8].tolist()}..."
                f" ({len(y)})"
            )
    return "same"


# ----------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=200.0,
        help="uncompressed size of the synthetic input (default %(default)g)",
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--tokenizer",
        default=sample_tokenizer_path(),
        help="tokenizer.json (default: the bundled sample tokenizer)",
    )
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=0.0,
        help=(
            "data_prep shard size; 0 = input / (4 x the most workers), so every worker "
            "has shards to take (default)"
        ),
    )
    parser.add_argument(
        "--megatron-lm",
        type=Path,
        default=None,
        help="a Megatron-LM checkout whose tools/preprocess_data.py runs beside ours",
    )
    parser.add_argument(
        "--cache-dir", default=os.path.join(tempfile.gettempdir(), "data_prep_bench")
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    shard_mb = args.shard_size_mb or args.size_mb / (4 * max(workers))
    cache = Path(args.cache_dir)
    peer = args.megatron_lm
    peer_note = None
    if peer is None:
        peer_note = "Megatron-LM: skipped (no --megatron-lm checkout given)"
    elif not (peer / "tools" / "preprocess_data.py").is_file():
        peer_note = f"Megatron-LM: skipped ({peer}/tools/preprocess_data.py not found)"
    print(
        f"input: {args.size_mb:g} MB synthetic jsonl in {cache}; tokenizer {args.tokenizer}; "
        f"workers {workers}; data_prep shards of {shard_mb:g} MB"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}"
    )
    print(peer_note or f"Megatron-LM: {peer / 'tools' / 'preprocess_data.py'}")
    if not os.path.isfile(args.tokenizer):
        print(f"error: tokenizer not found: {args.tokenizer}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0

    start = time.perf_counter()
    corpus = plain_copy(synthetic_corpus(cache, args.size_mb))
    input_bytes = corpus.stat().st_size
    print(
        f"corpus {corpus} ({input_bytes / 1e6:.1f} MB text) ready in"
        f" {time.perf_counter() - start:.1f} s"
    )

    rows = []
    with tempfile.TemporaryDirectory(dir=cache) as out:
        for count in workers:
            timings: List[Tuple[str, float, str]] = []
            ours_prefix = os.path.join(out, f"data_prep-{count}")
            start = time.perf_counter()
            result = build(
                BuildSpec(
                    reader="pile",
                    inputs=(str(corpus),),
                    tokenizer=args.tokenizer,
                    output=ours_prefix,
                    workers=count,
                    progress=False,
                    shard_bytes=int(shard_mb * (1 << 20)),
                )
            )
            timings.append(("blackmamba-prep", time.perf_counter() - start, "-"))
            docs, tokens = result.output.documents, result.output.tokens

            base_prefix = os.path.join(out, f"baseline-{count}")
            start = time.perf_counter()
            assert baseline(corpus, args.tokenizer, base_prefix, count) == (docs, tokens)
            identical = all(
                filecmp.cmp(base_prefix + ext, ours_prefix + ext, shallow=False)
                for ext in (".bin", ".idx")
            )
            timings.append(
                (
                    "megatron-style baseline",
                    time.perf_counter() - start,
                    "same bytes" if identical else "BYTES DIFFER",
                )
            )
            if peer_note is None:
                start = time.perf_counter()
                try:
                    theirs = megatron_lm(
                        peer, corpus, args.tokenizer, os.path.join(out, f"mlm-{count}"), count
                    )
                    timings.append(
                        (
                            "Megatron-LM preprocess_data.py",
                            time.perf_counter() - start,
                            compare_ids(ours_prefix, theirs),
                        )
                    )
                except RuntimeError as error:
                    peer_note = f"Megatron-LM: skipped ({error})"
            reference = timings[2][1] if len(timings) > 2 else timings[1][1]
            for tool, seconds, same in timings:
                rows.append(
                    (
                        tool,
                        count,
                        f"{seconds:.1f}",
                        f"{tokens / seconds:,.0f}",
                        f"{tokens / seconds / count:,.0f}",
                        f"{input_bytes / seconds / 1e6:.2f}",
                        f"{reference / seconds:.2f}x",
                        same,
                    )
                )
    print(f"{docs:,} documents, {tokens:,} tokens")
    if peer_note:
        print(peer_note)
    print(
        format_table(
            (
                "tool",
                "workers",
                "wall s",
                "tokens/s",
                "tokens/s per worker",
                "MB/s",
                "speed vs " + ("Megatron-LM" if peer_note is None else "baseline"),
                "token ids",
            ),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
