"""The bundled sample corpus: small, in The Pile's real format, with its tokenizer, and built
into an indexed dataset by ensure_sample_dataset in well under 30 s, once."""

from __future__ import annotations

import json
import time

from megatron_blackmamba.data_prep import (
    ensure_sample_dataset,
    load_tokenizer,
    sample_tokenizer_path,
)
from megatron_blackmamba.data_prep.readers.jsonl import decompressed_chunks

from .prep_helpers import REPO, read_documents

SAMPLE = REPO / "data" / "sample"


def test_sample_files_are_small_and_in_pile_format():
    files = sorted(p.name for p in SAMPLE.iterdir())
    assert files == [
        "00.jsonl.zst",
        "01.jsonl.zst",
        "LICENSE-PSF.txt",
        "README.md",
        "tokenizer.json",
    ]
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) <= 3 * 1024 * 1024
    subsets = set()
    for path in sorted(SAMPLE.glob("*.jsonl.zst")):
        for line in b"".join(decompressed_chunks(str(path))).splitlines():
            record = json.loads(line)
            assert isinstance(record["text"], str) and record["text"].strip()
            subsets.add(record["meta"]["pile_set_name"])
    assert subsets == {"StdlibDocs", "StdlibCode", "PythonDocsTopics"}


def test_sample_tokenizer():
    tokenizer = load_tokenizer(sample_tokenizer_path())
    assert tokenizer.vocab_size == 8192 and tokenizer.eod == 0
    text = "def ensure_sample_dataset(cache_dir):\n    return prefix  # café"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_ensure_sample_dataset_builds_once(tmp_path):
    start = time.perf_counter()
    prefix = ensure_sample_dataset(str(tmp_path / "cache"))
    assert time.perf_counter() - start < 30
    documents = read_documents(prefix)
    tokens = sum(map(len, documents))
    assert len(documents) > 500 and 1_000_000 <= tokens <= 3_000_000
    assert all(doc[-1] == 0 for doc in documents)  # EOD closes every document
    mtime = (tmp_path / "cache").stat().st_mtime_ns
    assert ensure_sample_dataset(str(tmp_path / "cache")) == prefix
    assert (tmp_path / "cache").stat().st_mtime_ns == mtime
