"""Helpers for data_prep tests: varied texts, corpus writers for every supported format, and
reading outputs back through megatron-core."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]

_WORDS = (
    "the of and to in is was for on that with as by at from it be this which or are "
    "data model token shard merge stream python state space mamba expert router layer "
    "def return class import self None True False print lambda yield"
).split()
EXTRAS = [
    "café",
    "naïve",
    "日本語のテキスト",
    "Ünïcödé",
    "emoji 🙂🚀",
    'quote " and \\ back',
    "tab\there",
    "x = {'a': [1, 2, 3]}",
    "if x:\n    return y\n",
]


def make_texts(count: int, seed: int) -> List[str]:
    """Varied documents: prose, code, unicode, JSON-special characters, inner newlines."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 60))]
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words)), rng.choice(EXTRAS))
            paragraphs.append(" ".join(words).capitalize() + ".")
        texts.append("\n\n".join(paragraphs))
    return texts


def expected_ids(hf_tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Direct tokenisation + EOD: what every stored document must equal."""
    eod = hf_tokenizer.token_to_id("<|endoftext|>")
    return [hf_tokenizer.encode(t, add_special_tokens=False).ids + [eod] for t in texts]


def read_documents(prefix: str) -> List[List[int]]:
    """Documents as megatron-core's IndexedDataset reads them (one sequence per document)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


# ------------------------------------------------------------------ corpus writers


def jsonl_bytes(records: Sequence[object]) -> bytes:
    return b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records)


def write_compressed(path: Path, data: bytes) -> Path:
    """Write ``data`` plain, gzip'ed or zstd-compressed according to the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def pile_records(
    texts: Sequence[str], subsets: Sequence[str], key: str = "pile_set_name"
) -> List[Dict[str, object]]:
    return [{"text": t, "meta": {key: s}} for t, s in zip(texts, subsets)]


def write_parquet(
    path: Path, texts: Sequence[Optional[str]], row_group_size: int = 7, column: str = "content"
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(texts))), column: pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_pg19(root: Path, split: str, books: Dict[str, bytes]) -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for book_id, data in books.items():
        (folder / f"{book_id}.txt").write_bytes(data)
    with open(root / "metadata.csv", "a", encoding="utf-8") as f:
        for book_id in books:
            f.write(f'{book_id},"Title of {book_id}, a novel",1900,http://example.org/{book_id}\n')
    return folder


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, **kwargs):
    """Run ``blackmamba-prep`` in a subprocess (from the repo root)."""
    import subprocess

    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "megatron_blackmamba.data_prep", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        **kwargs,
    )


def build_args(corpus: str, tokenizer: str, output, *extra: str) -> list[str]:
    """``blackmamba-prep build`` arguments for a pile-format test corpus, in tiny shards."""
    return [
        "build",
        "--reader",
        "pile",
        "--input",
        corpus,
        "--tokenizer",
        tokenizer,
        "--output",
        str(output),
        "--shard-size-mb",
        "0.002",
        "--no-progress",
        *extra,
    ]
